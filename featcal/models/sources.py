"""The models of a run (merged, base, each expert) as the driver reads them: one block at a time.

A source is an in-memory module, or a local safetensors checkpoint read lazily (`LazyModel`):
then only the block being calibrated, and during capture the backbone's front (embeddings), is
ever in memory. A model with stages (T5: encoder, then decoder) has one block list per stage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import FeatCalError, Location
from ..io.checkpoint import load_model, resolve
from ..io.lazy_checkpoint import LazyCheckpoint
from .adapters import ModelAdapter, find_adapter
from .lazy_model import LazyModel, put_slot, tensor_slots

log = logging.getLogger("featcal")

ModelLike = nn.Module | str | os.PathLike


def device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move `module` to `device` for the duration, then back where it was."""
    home = device_of(module)
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextmanager
def front_on_device(backbone: nn.Module, blocks: list[nn.Module], device: torch.device) -> Iterator[None]:
    """`backbone`'s tensors outside `blocks` (embeddings, norms) on `device` for the duration; the
    blocks stay where they are (each goes to the device in its turn, as the memory plan counts)."""
    slots = tensor_slots(backbone, skip=blocks)
    moved: dict[int, torch.Tensor] = {}  # one copy of a tensor that several modules share
    for _, owner, kind, leaf, tensor in slots:
        if tensor.device != device:
            if id(tensor) not in moved:
                copy = tensor.detach().to(device)
                moved[id(tensor)] = nn.Parameter(copy, tensor.requires_grad) if kind == "param" else copy
            put_slot(owner, kind, leaf, moved[id(tensor)])
    try:
        yield
    finally:
        for _, owner, kind, leaf, tensor in slots:
            put_slot(owner, kind, leaf, tensor)


class ModelSource:
    """One role's model: its adapter, its stages and their blocks (real, or skeletons when lazy)."""

    def __init__(self, model: nn.Module, role: str, lazy: LazyModel | None = None) -> None:
        self.model, self.role, self.lazy = model, role, lazy
        self.adapter: ModelAdapter = find_adapter(model, role)
        self.adapter.check_model(model, role)
        self.stages: list[ModelAdapter] = []
        stage: ModelAdapter | None = self.adapter
        while stage is not None:
            self.stages.append(stage)
            stage = stage.encdec.next_stage
        self.blocks = [list(s.blocks(s.backbone(model))) for s in self.stages]
        if lazy is not None:
            lazy.check(block for stage in self.blocks for block in stage)

    def stage_name(self, stage: int) -> str | None:
        """The stage's name in messages and reports (its adapter's), when there are several."""
        return self.stages[stage].name if len(self.stages) > 1 else None

    def where(self, stage: int, index: int) -> Location:
        """Block `index` of a stage, for messages."""
        return Location(stage=self.stage_name(stage), block=index)

    @property
    def dtype(self) -> torch.dtype:
        return self.lazy.dtype if self.lazy else next(self.model.parameters()).dtype

    @contextmanager
    def block(self, stage: int, index: int, device: torch.device) -> Iterator[nn.Module]:
        """Block `index` of a stage with its weights on `device` for the duration (a lazy source
        reads it from disk and frees it after)."""
        skeleton = self.blocks[stage][index]
        if self.lazy is None:
            with on_device(skeleton, device) as block:
                yield block
            return
        yield self.lazy.block(skeleton, device)  # the caller drops it after the block: then it is freed

    @contextmanager
    def front(self, stage: int, device: torch.device) -> Iterator[nn.Module]:
        """The model, ready to run its stage's backbone up to the first block on `device`."""
        backbone = self.stages[stage].backbone(self.model)
        if self.lazy is None:
            with front_on_device(backbone, self.blocks[stage], device):
                yield self.model
            return
        with self.lazy.front(backbone, self.blocks[stage], device):
            yield self.model

    def block_bytes(self, stage: int, index: int) -> int:
        """Bytes of one block's parameters in the dtype it runs in."""
        return sum(p.numel() for p in self.blocks[stage][index].parameters()) * self.dtype.itemsize


def open_source(model: ModelLike, role: str, dtype: torch.dtype | None = None) -> ModelSource:
    """A source for a module, a local checkpoint directory (read lazily when it holds safetensors,
    its floating tensors cast to `dtype`), or a hub id (loaded in memory)."""
    if isinstance(model, nn.Module):
        return ModelSource(model, role)
    if not isinstance(model, (str, os.PathLike)):
        kind = type(model).__name__
        raise FeatCalError(f"the {role} must be a torch module or a checkpoint path, got {kind}")
    where = resolve(model)
    if isinstance(where, Path) and LazyCheckpoint.holds_safetensors(where):
        lazy = LazyModel(where, role, dtype)
        return ModelSource(lazy.model, role, lazy)
    if isinstance(where, Path):
        log.warning("the %s checkpoint %s has no safetensors and is loaded whole into memory", role, where)
    loaded = load_model(where)
    return ModelSource(loaded if dtype is None else loaded.to(dtype), role)
