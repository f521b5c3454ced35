"""Calibrated blocks kept one file each, exactly as they were calibrated, so that an interrupted
run can be resumed: `<directory>/<n>.safetensors` (n: the block's place in forward order over
the stages) holds the block's parameters by name. An in-memory run keeps every block so (the
whole model is saved with `save_pretrained` at the end); a streamed run keeps those whose
checkpoint stores them in a narrower dtype than they were calibrated in.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import DamagedOutputError, FeatCalError
from .checkpoint import copy_companions, local_files, save_model
from .sharded_writer import save_tensors


class BlockFiles:
    """Calibrated blocks (of `blocks`, one list per stage) in `directory`: `write`, `read_into`."""

    def __init__(self, blocks: list[list[nn.Module]], directory: Path) -> None:
        self.directory = Path(directory)
        self.offsets = [sum(len(s) for s in blocks[:k]) for k in range(len(blocks))]
        self.directory.mkdir(parents=True, exist_ok=True)

    def _file(self, stage: int, index: int) -> Path:
        return self.directory / f"{self.offsets[stage] + index:05d}.safetensors"

    def has(self, stage: int, index: int) -> bool:
        return self._file(stage, index).is_file()

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
        return DamagedOutputError(
            f"the partial output {self.directory.parent} is damaged: {file.name} in {self.directory.name} "
            f"(a finished block) cannot be read: {why}; pass --overwrite to discard it and start over"
        )


class ModuleOutput(BlockFiles):
    """The output of an in-memory run: every block kept in `directory`/featcal-blocks until the
    calibrated `model` is saved into `directory` (`finish`)."""

    def __init__(self, model: nn.Module, blocks: list[list[nn.Module]], directory: Path) -> None:
        super().__init__(blocks, Path(directory) / "featcal-blocks")
        self.model, self.output = model, Path(directory)

    def finish(self) -> None:
        """The model saved, with the tokenizer, processor and generation files of the directory
        (or cached hub snapshot) it was loaded from, if any. Its model card and other files stay
        behind: a module merged in memory carries its base's name_or_path."""
        save_model(self.model, self.output)
        source = local_files(getattr(self.model, "name_or_path", None))
        if source is not None:
            copy_companions(source, self.output)

    @property
    def card_source(self) -> None:
        """No model card is carried over (see finish)."""
        return None
