"""Checks of a run's inputs before any work: the device, the tasks, their batches (and that they
are inputs the merged model takes: its input keys, token ids within its vocabulary, images of
its size), and that every model has the merged model's architecture. Each error names the task,
batch, key, stage, block, module or shape at fault."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FeatCalError, Location
from ..models.modules import ModuleRef, calibrated_modules
from ..models.sources import ModelSource


def check_tasks(experts: Mapping, data: Mapping) -> list[str]:
    """The tasks, in order; an error if experts and data do not name the same tasks."""
    if not experts:
        raise FeatCalError("no experts given: experts must map each task to its fine-tuned model")
    no_data = sorted(set(experts) - set(data))
    no_expert = sorted(set(data) - set(experts))
    if no_data:
        raise FeatCalError(f"tasks {no_data} have an expert but no calibration data")
    if no_expert:
        raise FeatCalError(f"tasks {no_expert} have calibration data but no expert")
    return list(experts)


def check_batches(task: str, batches: Iterable) -> list:
    """A task's batches as a list; an error naming the task and batch if one is not a batch."""
    batches = list(batches)
    if not batches:
        raise FeatCalError(f"{Location(task=task)} has no calibration data: its batch iterable is empty")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (Tensor, Mapping)):
            raise FeatCalError(
                f"{Location(task=task)}: batch {i} is a {type(batch).__name__}; a batch must be a "
                "tensor or a dict of tensors"
            )
    return batches


def check_device(device: str | torch.device | None, check_index: bool = True) -> torch.device | None:
    """`device` as a torch.device (None stays None); an error naming the value when torch does not
    know it, or when it is a CUDA device that this torch cannot use (`check_index`: nor a GPU
    index beyond those this process sees)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FeatCalError(
            f"device {device!r} is not a device torch knows: give e.g. 'cpu', 'cuda' or 'cuda:1'"
        ) from None
    if parsed.type != "cuda":
        return parsed
    shown = device if isinstance(device, str) else str(parsed)
    if not torch.cuda.is_available():
        if torch.version.cuda is None and torch.version.hip is None:
            build = "a CPU-only build"
        else:
            built = torch.version.cuda or torch.version.hip
            build = f"built for CUDA {built}, but it finds no GPU: check the driver and CUDA_VISIBLE_DEVICES"
        raise FeatCalError(
            f"device {shown!r}: CUDA is not available to this torch ({torch.__version__}, {build}); "
            "give device 'cpu' (--device cpu), or run where a CUDA build of torch sees a GPU"
        )
    count = torch.cuda.device_count()
    if check_index and parsed.index is not None and parsed.index >= count:
        raise FeatCalError(f"device {shown!r}: this process sees {count} GPUs (cuda:0 to cuda:{count - 1})")
    return parsed


@dataclass(frozen=True)
class ModelInputs:
    """What the merged model reads from a batch, from its adapter, its backbone's forward signature
    and its config.

    model: the model, for messages ("llama model (LlamaForCausalLM)").
    first: the backbone's first input, which a bare tensor batch is (None: neither says).
    accepted: the batch keys passed to the backbone (None: any), and those a later stage reads.
    alternatives: inputs that stand in for `first` (precomputed `..._embeds`).
    vocab_size: of its token embedding (the text config's, for a wrapper), None if unknown.
    image: (channels, height, width) of the images it takes, None if unknown (channels None when
        the config does not give them).
    """

    model: str
    first: str | None
    accepted: tuple[str, ...] | None
    alternatives: tuple[str, ...]
    vocab_size: int | None
    image: tuple[int | None, int, int] | None

    def reads(self, key: str) -> bool:
        return self.accepted is None or key in self.accepted


def model_inputs(merged: ModelSource) -> ModelInputs:
    """The inputs the merged model takes (a streamed model's skeleton has its config too)."""
    adapter, model = merged.adapter, merged.model
    backbone = adapter.backbone(model)
    try:
        params = list(inspect.signature(backbone.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature inspect can read
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if adapter.inputs is not None:
        accepted: tuple[str, ...] | None = (*adapter.inputs, *adapter.encdec.batch_keys)
    elif named and not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = (*named, *adapter.encdec.batch_keys)
    else:
        accepted = None
    first = positional[0] if positional else (adapter.inputs[0] if adapter.inputs else None)
    alternatives = tuple(k for k in (accepted or named) if k.endswith("_embeds") and k != first)
    configs = [
        c for c in (getattr(backbone, "config", None), getattr(model, "config", None)) if c is not None
    ]
    return ModelInputs(
        model=f"{adapter.name} model ({type(model).__name__})",
        first=first,
        accepted=accepted,
        alternatives=alternatives,
        vocab_size=_vocab_size(configs),
        image=_image_shape(configs),
    )


def _vocab_size(configs: list) -> int | None:
    for config in configs:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for part in (config, text):
            size = getattr(part, "vocab_size", None)
            if isinstance(size, int):
                return size
    return None


def _image_shape(configs: list) -> tuple[int | None, int, int] | None:
    for config in configs:
        for part in (config, getattr(config, "vision_config", None)):
            size = getattr(part, "image_size", None)
            if isinstance(size, int):
                size = (size, size)
            if isinstance(size, (tuple, list)) and len(size) == 2:
                channels = getattr(part, "num_channels", None)
                return (channels if isinstance(channels, int) else None, int(size[0]), int(size[1]))
    return None


_ID_KEYS = ("input_ids", "decoder_input_ids", "labels")  # token ids the model embeds
_MASK_OF = {"input_ids": "attention_mask", "decoder_input_ids": "decoder_attention_mask"}
_IGNORED_LABEL = -100  # a label the decoder inputs skip (weight 0)
_HINTS = {
    "input_ids": "token ids (examples, tokens), with attention_mask",
    "pixel_values": "images (examples, channels, height, width)",
}


def check_inputs(merged: ModelSource, task: str, batches: Sequence) -> None:
    """Refuse batches the merged model cannot read: a batch without the model's input (image
    inputs given to a text model, token ids to a vision model), token ids that are not integers
    or lie outside [0, vocab_size), an attention mask of another shape than its ids, images whose
    channels or size differ from the model config's. A bare tensor batch is the model's first
    input. The message names the task, batch, key and the shape or value at fault."""
    spec = model_inputs(merged)
    ranges: dict[str, _IdRange] = {}
    for i, batch in enumerate(batches):
        where = Location(task=task, batch=i)
        if isinstance(batch, Tensor):
            if spec.first is None:
                continue
            tensors = {spec.first: batch}
        else:
            _check_keys(spec, where, batch)
            tensors = batch
        for key in _ID_KEYS:
            ids = tensors.get(key)
            if isinstance(ids, Tensor) and spec.reads(key):
                mask = tensors.get(_MASK_OF.get(key, ""))
                _check_id_tensor(where, _name(key, batch), ids, mask, _MASK_OF.get(key))
                ranges.setdefault(key, _IdRange()).add(
                    ids, i, ignored=_IGNORED_LABEL if key == "labels" else None
                )
        pixels = tensors.get("pixel_values")
        if isinstance(pixels, Tensor) and spec.reads("pixel_values"):
            resized = spec.reads("interpolate_pos_encoding") and bool(tensors.get("interpolate_pos_encoding"))
            _check_pixels(spec, where, _name("pixel_values", batch), pixels, resized)
    for key, found in ranges.items():
        _check_vocabulary(spec, task, _name(key, batches[0]), found)


def _name(key: str, batch) -> str:
    """A batch key as messages name it (a bare tensor batch is the model's first input)."""
    return f"the tensor batches ({key}, the model's first input)" if isinstance(batch, Tensor) else key


def _check_keys(spec: ModelInputs, where: Location, batch: Mapping) -> None:
    if spec.first is None or not spec.reads(spec.first):
        return
    if spec.first in batch or any(k in batch for k in spec.alternatives):
        return
    hint = f" ({_HINTS[spec.first]})" if spec.first in _HINTS else ""
    raise FeatCalError(
        f"{where}: the batch holds {sorted(batch)} but the merged {spec.model} takes "
        f"{spec.first}{hint}: give each batch its {spec.first}, or calibrate a model that reads "
        f"{sorted(batch)}"
    )


def _check_id_tensor(where: Location, name: str, ids: Tensor, mask, mask_name: str | None) -> None:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise FeatCalError(
            f"{where}: {name} are {ids.dtype}; token ids must be an integer tensor (torch.long)"
        )
    if ids.dim() != 2:
        raise FeatCalError(f"{where}: {name} have shape {tuple(ids.shape)}; token ids are (examples, tokens)")
    if isinstance(mask, Tensor) and tuple(mask.shape) != tuple(ids.shape):
        raise FeatCalError(
            f"{where}: {mask_name} has shape {tuple(mask.shape)} but {name} {tuple(ids.shape)}; "
            "they must have the same shape (examples, tokens)"
        )


@dataclass
class _IdRange:
    """The smallest and largest token id of a key over a task's batches, and their batches."""

    smallest: int | None = None
    smallest_batch: int = 0
    largest: int | None = None
    largest_batch: int = 0

    def add(self, ids: Tensor, batch: int, ignored: int | None = None) -> None:
        if ignored is not None:
            ids = ids[ids != ignored]
        if ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if self.smallest is None or low < self.smallest:
            self.smallest, self.smallest_batch = low, batch
        if self.largest is None or high > self.largest:
            self.largest, self.largest_batch = high, batch


def _check_vocabulary(spec: ModelInputs, task: str, name: str, found: _IdRange) -> None:
    if found.smallest is None:
        return
    where, size = Location(task=task), spec.vocab_size
    if found.smallest < 0:
        allowed = "are never negative"
        if size is not None:
            allowed = f"lie in [0, {size}) for the merged {spec.model} (vocab_size {size})"
        raise FeatCalError(
            f"{where}: {name} hold a negative token id, {found.smallest} (batch {found.smallest_batch}); "
            f"token ids {allowed}"
        )
    if size is not None and found.largest >= size:
        raise FeatCalError(
            f"{where}: {name} hold token ids up to {found.largest} (batch {found.largest_batch}), outside "
            f"the vocabulary of the merged {spec.model}: vocab_size {size}, ids 0 to {size - 1}; was the "
            "data tokenized for another model?"
        )


def _check_pixels(spec: ModelInputs, where: Location, name: str, pixels: Tensor, resized: bool) -> None:
    if pixels.dim() != 4:
        raise FeatCalError(
            f"{where}: {name} have shape {tuple(pixels.shape)}; images are "
            "(examples, channels, height, width)"
        )
    if spec.image is None:
        return
    channels, height, width = spec.image
    _, c, h, w = pixels.shape
    if (channels is not None and c != channels) or (not resized and (h, w) != (height, width)):
        want = tuple(pixels.shape[:1]) + (channels if channels is not None else c, height, width)
        raise FeatCalError(
            f"{where}: {name} have shape {tuple(pixels.shape)} but the merged {spec.model} takes images "
            f"of shape {want} (its config's num_channels {channels}, image_size {height}x{width})"
        )


def check_architecture(merged: ModelSource, other: ModelSource) -> None:
    """Same stages and blocks, same calibrated modules, same parameter shapes; else name the fault."""
    if [a.name for a in other.stages] != [a.name for a in merged.stages]:
        raise FeatCalError(
            f"the {other.role} is a {other.adapter.name} model but the merged model a {merged.adapter.name}"
        )
    for stage, (mine, theirs) in enumerate(zip(merged.blocks, other.blocks)):
        where = f"{merged.stages[stage].name} " if len(merged.stages) > 1 else ""
        if len(theirs) != len(mine):
            raise FeatCalError(
                f"the {other.role} has {len(theirs)} {where}blocks but the merged model has {len(mine)}"
            )
        kind_of = merged.stages[stage].module_kind
        for index, (mb, ob) in enumerate(zip(mine, theirs)):
            _check_block(
                merged.where(stage, index),
                calibrated_modules(mb, kind_of),
                calibrated_modules(ob, kind_of),
                other.role,
            )


def _check_block(
    where: Location, mine: dict[str, ModuleRef], theirs: dict[str, ModuleRef], role: str
) -> None:
    if list(mine) != list(theirs):
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        raise FeatCalError(
            f"{where}: the {role} differs from the merged model: "
            f"modules missing there {missing}, modules only there {extra}"
        )
    for name, ref in mine.items():
        _check_module(where.at(module=name), ref, theirs[name], role)


def _check_module(where: Location, ref: ModuleRef, other: ModuleRef, role: str) -> None:
    if other.kind != ref.kind:
        raise FeatCalError(f"{where}: a {ref.kind} in the merged model but a {other.kind} in the {role}")
    mine, theirs = ref.parameter_shapes(), other.parameter_shapes()
    for param in ("weight", "bias"):
        if mine.get(param) != theirs.get(param):
            raise FeatCalError(
                f"{where}: {param} has shape {theirs.get(param)} in the "
                f"{role} but {mine.get(param)} in the merged model"
            )
