"""The finished blocks of an in-memory run with an output directory, one file each, so that an
interrupted run can be resumed: `blocks/<n>.safetensors` (n: the block's place in forward order
over the stages) holds the block's parameters by name, as they were calibrated. The whole model
is saved with `save_pretrained` at the end, and the block files removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import FeatCalError
from .checkpoint import save_model
from .sharded_writer import save_tensors


class BlockFiles:
    """Writes each calibrated block of `model` into `directory`/blocks: `write`, `read_into`, `finish`."""

    def __init__(self, model: nn.Module, blocks: list[list[nn.Module]], directory: Path) -> None:
        self.model, self.directory = model, Path(directory)
        self.offsets = [sum(len(s) for s in blocks[:k]) for k in range(len(blocks))]
        self.blocks_directory = self.directory / "blocks"
        self.blocks_directory.mkdir(parents=True, exist_ok=True)

    def _file(self, stage: int, index: int) -> Path:
        return self.blocks_directory / f"{self.offsets[stage] + index:05d}.safetensors"

    def write(self, stage: int, index: int, block: nn.Module) -> None:
        save_tensors(self._file(stage, index), dict(block.named_parameters()), {"format": "pt"})

    def read_into(self, stage: int, index: int, block: nn.Module) -> None:
        """Copy a finished block's calibrated parameters from its file into `block`."""
        file = self._file(stage, index)
        try:
            tensors = load_file(file)
        except (OSError, ValueError, SafetensorError) as err:
            raise self._damaged(file, err) from err
        params = dict(block.named_parameters())
        if set(tensors) != set(params) or any(tensors[k].shape != p.shape for k, p in params.items()):
            raise self._damaged(file, "it holds other parameters than the block")
        for name, param in params.items():
            param.data.copy_(tensors[name])

    def _damaged(self, file: Path, why) -> FeatCalError:
        return FeatCalError(
            f"the partial output {self.directory} is damaged: {file.name} (a finished block) cannot be "
            f"read: {why}; pass --overwrite to discard it and start over"
        )

    def finish(self) -> None:
        """The whole calibrated model, saved with save_pretrained; the block files removed."""
        save_model(self.model, self.directory)
        shutil.rmtree(self.blocks_directory)
