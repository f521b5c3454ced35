"""A checkpoint directory as a model skeleton whose tensors stay on disk until a block needs them.

The skeleton is the model built from its config with every parameter on the `meta` device (no
memory, no initialisation) and its buffers real (rotary frequencies, position ids: small, and
often not saved). `block` reads one block's tensors from the safetensors shards, straight to
the target device, into a copy of the skeleton's block; `front` fills the parameters a backbone
uses before its first block (embeddings) for as long as it is needed. Nothing else is read.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import FeatCalError
from ..io.expert_layout import ExpertLayout
from ..io.lazy_checkpoint import LazyCheckpoint


@contextmanager
def meta_parameters() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta device; buffers stay."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(path: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The architecture saved in `path`/config.json, with parameters on meta, in `dtype`."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with meta_parameters():
            if cls is None:
                model = transformers.AutoModel.from_config(config)
            else:
                model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def tensor_slots(module: nn.Module, skip: Iterable[nn.Module] = (), prefix: str = "") -> list[tuple]:
    """(dotted name, owner module, 'param' | 'buffer', leaf name, tensor) for every parameter and
    buffer of `module` outside the submodules `skip`, tied names included."""
    skip_ids = {id(m) for m in skip}
    slots, stack = [], [(prefix, module)]
    while stack:
        name, owner = stack.pop()
        for kind, table in (("param", owner._parameters), ("buffer", owner._buffers)):
            for leaf, tensor in table.items():
                if tensor is not None:
                    slots.append((f"{name}.{leaf}" if name else leaf, owner, kind, leaf, tensor))
        for child_name, child in owner._modules.items():
            if child is not None and id(child) not in skip_ids:
                stack.append((f"{name}.{child_name}" if name else child_name, child))
    return slots


def put_slot(owner: nn.Module, kind: str, leaf: str, tensor: Tensor) -> None:
    """Set a slot of `tensor_slots` to `tensor` (a parameter or a buffer, as `kind` says)."""
    getattr(owner, "_buffers" if kind == "buffer" else "_parameters")[leaf] = tensor


class LazyModel:
    """A model skeleton over a safetensors checkpoint directory; tensors are read block by block.

    dtype: floating tensors are cast to it when read (None: the checkpoint's floating dtype).
    """

    def __init__(self, path: str | os.PathLike, role: str, dtype: torch.dtype | None = None) -> None:
        self.path, self.role = Path(path), role
        self.checkpoint = ExpertLayout(LazyCheckpoint(path))
        stored = [self.checkpoint.dtype(k) for k in self.checkpoint.keys()]
        floating = [d for d in stored if d.is_floating_point]
        self.stored_dtype = floating[0] if floating else torch.float32
        self.dtype = dtype or self.stored_dtype
        self.model = empty_model(path, self.dtype)
        # Tied parameters have several names; any of them may be the one the checkpoint holds.
        self._aliases: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            self._aliases.setdefault(id(param), []).append(name)
        self._prefix = self._checkpoint_prefix()

    def _checkpoint_prefix(self) -> tuple[str, str]:
        """(strip, add): how model names map to checkpoint keys when they were saved from a
        task-head wrapper or from its base model (prefix `base_model_prefix.`)."""
        prefix = getattr(self.model, "base_model_prefix", "")
        names = [n for n, _ in self.model.named_parameters()]
        if not prefix or any(n in self.checkpoint for n in names):
            return "", ""
        if any(n.startswith(prefix + ".") and n[len(prefix) + 1 :] in self.checkpoint for n in names):
            return prefix + ".", ""
        return "", prefix + "."

    def key(self, name: str) -> str | None:
        """The checkpoint key holding the model tensor `name` (a full dotted name), or None."""
        param = self._parameter(name)
        aliases = self._aliases.get(id(param), []) if param is not None else []
        for candidate in map(self._mapped, [name, *aliases]):
            if candidate in self.checkpoint:
                return candidate
        return None

    def _mapped(self, name: str) -> str:
        strip, add = self._prefix
        return add + (name[len(strip) :] if strip and name.startswith(strip) else name)

    def _parameter(self, name: str) -> nn.Parameter | None:
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            return None

    def name_of(self, module: nn.Module) -> str:
        """The dotted name of a submodule of the skeleton."""
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise FeatCalError(f"{self.role}: module {type(module).__name__} is not part of the model")

    def check(self, modules: Iterable[nn.Module]) -> None:
        """Every parameter of `modules` is in the checkpoint with its shape; else name what is wrong."""
        for module in modules:
            prefix = self.name_of(module)
            for name, param in module.named_parameters():
                full = f"{prefix}.{name}" if prefix else name
                key = self.key(full)
                if key is None:
                    missing = self._mapped(full)
                    raise FeatCalError(
                        f"the {self.role} checkpoint {self.path} has no tensor {missing!r} (if it was saved "
                        "with other tensor names, load it with from_pretrained and pass the module)"
                    )
                shape = self.checkpoint.shape(key)
                if tuple(shape) != tuple(param.shape):
                    raise FeatCalError(
                        f"the {self.role} checkpoint {self.path}: tensor {key!r} has shape {tuple(shape)} "
                        f"but the model built from its config.json expects {tuple(param.shape)}"
                    )

    def _slots(self, module: nn.Module, skip: Iterable[nn.Module] = ()) -> list[tuple]:
        """(checkpoint key or None, owner module, 'param' | 'buffer', leaf name, tensor) for every
        parameter and buffer of `module` outside the submodules `skip`, tied names included."""
        return [
            (self.key(name), owner, kind, leaf, tensor)
            for name, owner, kind, leaf, tensor in tensor_slots(module, skip, self.name_of(module))
        ]

    def _fill(self, slots: list[tuple], device: torch.device, required: bool = True) -> None:
        """Put the checkpoint's tensors (or, for unsaved buffers, the built ones) on `device` into
        slots; parameters the checkpoint lacks are an error if `required`, else stay on meta."""
        keys = {id(t): key for key, _, _, _, t in slots if key is not None}
        read = self.checkpoint.read(list(dict.fromkeys(keys.values())), device=device)
        real: dict[int, Tensor] = {}  # a tied parameter gets one tensor under all of its names
        for _, owner, kind, leaf, tensor in slots:
            if id(tensor) not in real:
                if id(tensor) in keys:
                    value = self._cast(read[keys[id(tensor)]])
                elif kind == "buffer" or required is False:
                    value = tensor  # a buffer built from the config, or a part the run never calls
                else:
                    raise FeatCalError(
                        f"the {self.role} checkpoint {self.path} has no tensor for parameter {leaf!r} "
                        f"of {type(owner).__name__}"
                    )
                value = value.to(device) if value.device.type != "meta" else value
                real[id(tensor)] = nn.Parameter(value, requires_grad=False) if kind == "param" else value
            put_slot(owner, kind, leaf, real[id(tensor)])

    def _cast(self, t: Tensor) -> Tensor:
        t = t.to(self.dtype) if t.is_floating_point() else t
        # A view into a memory-mapped shard may sit at any offset; CPU BLAS results depend on the
        # operands' alignment, so such a view is copied to an allocation of torch's (64 bytes):
        # a streamed run then computes exactly what an in-memory run does.
        if t.device.type == "cpu" and t.data_ptr() % 64:
            t = t.clone()
        return t

    def block(self, block: nn.Module, device: torch.device) -> nn.Module:
        """A real copy of a skeleton block, its tensors read from the checkpoint onto `device`."""
        slots = self._slots(block)
        real = copy.deepcopy(block)
        memo = dict(zip(map(id, block.modules()), real.modules()))
        self._fill([(k, memo[id(o)], kind, leaf, t) for k, o, kind, leaf, t in slots], device)
        return real

    def stored_keys(self, block: nn.Module) -> list[str]:
        """The checkpoint keys holding the tensors of a skeleton block."""
        return [key for key, *_ in self._slots(block) if key is not None]

    def stored(self, block: nn.Module, real: nn.Module) -> dict[str, Tensor]:
        """{checkpoint key: tensor, as it is in `real`} of `real`, a copy of skeleton `block` made
        by `self.block`, for writing it back in the checkpoint's layout (cast to
        `checkpoint.dtype(key)` to store it)."""
        memo = dict(zip(map(id, block.modules()), real.modules()))
        out = {}
        for key, owner, kind, leaf, _ in self._slots(block):
            if key is not None:
                table = memo[id(owner)]._buffers if kind == "buffer" else memo[id(owner)]._parameters
                out[key] = table[leaf].detach()
        return out

    def load_stored(self, block: nn.Module, real: nn.Module, tensors: dict[str, Tensor]) -> None:
        """The inverse of `stored`: copy `tensors` (checkpoint key -> tensor) into `real`."""
        memo = dict(zip(map(id, block.modules()), real.modules()))
        for key, owner, kind, leaf, _ in self._slots(block):
            if key is not None:
                table = memo[id(owner)]._buffers if kind == "buffer" else memo[id(owner)]._parameters
                table[leaf].data.copy_(tensors[key])

    @contextmanager
    def front(self, backbone: nn.Module, blocks: Iterable[nn.Module], device: torch.device):
        """Fill `backbone`'s tensors outside `blocks` (embeddings, norms) for the duration."""
        # Parts after the blocks (a pooler) may be missing: the forward stops at the first block.
        slots = self._slots(backbone, skip=blocks)
        self._fill(slots, device, required=False)
        try:
            yield backbone
        finally:
            for _, owner, kind, leaf, tensor in slots:
                put_slot(owner, kind, leaf, tensor)
