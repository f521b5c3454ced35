"""The calibrated checkpoint of a streamed run, written while the run goes.

The merged checkpoint's tensors outside the blocks (embeddings, final norm, heads, anything the
model does not know) are copied first, one source shard at a time; each block is written as
its own shard as soon as it is calibrated, in the checkpoint's stored dtypes and names; the
index, config.json and the tokenizer / processor files come last. The caller writes into the
partial output directory and renames it when the run succeeds. A resumed run keeps the shards
already there: those outside the blocks when whole, and those of the finished blocks.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from torch import nn

from ..errors import DamagedOutputError
from ..models.lazy_model import LazyModel
from .block_files import BlockFiles
from .checkpoint import copy_non_weights
from .sharded_writer import ShardedWriter


class OutputCheckpoint:
    """Writes the calibrated model into `directory`: `write` each block, then `finish`.
    `finished`: the blocks (in forward order over the stages) whose shards a resumed run keeps."""

    def __init__(
        self, merged: LazyModel, blocks: list[list[nn.Module]], directory: Path, finished: int = 0
    ) -> None:
        self.merged, self.blocks, self.directory = merged, blocks, Path(directory)
        checkpoint = merged.checkpoint
        in_blocks = {
            source
            for stage in blocks
            for block in stage
            for key in merged.stored_keys(block)
            for source in checkpoint.sources(key)
        }
        rest: dict[str, list[str]] = {}
        for key in checkpoint.keys():
            if key not in in_blocks:
                rest.setdefault(checkpoint.shard_of(key), []).append(key)
        self.first_block = len(rest)
        self.offsets = [sum(len(s) for s in blocks[:k]) for k in range(len(blocks))]
        self.writer = ShardedWriter(directory, len(rest) + sum(len(s) for s in blocks))
        for number, keys in enumerate(rest.values()):
            if not self.writer.adopt_shard(number, keys):
                self.writer.write_shard(number, checkpoint.read(keys))
        self.exact = BlockFiles(blocks, self.directory / "featcal-exact-blocks")
        flat = [(k, i) for k, stage in enumerate(blocks) for i in range(len(stage))]
        for stage, index in flat[:finished]:
            keys = self._stored(blocks[stage][index])
            if not self.writer.adopt_shard(self._number(stage, index), keys):
                raise DamagedOutputError(
                    f"the partial output {self.directory} is damaged: the shard of "
                    f"{self._file(stage, index).name} (a finished block) is missing, incomplete or holds "
                    "other tensors; pass --overwrite to discard it and start over"
                )

    def _stored(self, skeleton: nn.Module) -> list[str]:
        """The checkpoint's own keys of a block's tensors (per-expert keys of fused experts)."""
        checkpoint = self.merged.checkpoint
        return [s for key in self.merged.stored_keys(skeleton) for s in checkpoint.sources(key)]

    def _number(self, stage: int, index: int) -> int:
        return self.first_block + self.offsets[stage] + index

    def _file(self, stage: int, index: int) -> Path:
        return self.directory / self.writer.shard_name(self._number(stage, index))

    def write(self, stage: int, index: int, block: nn.Module) -> None:
        """Write a calibrated block (a copy of skeleton block `index` of `stage`) as its shard; a
        block that its stored dtypes round is also kept exactly, for a resumed run to replay."""
        checkpoint = self.merged.checkpoint
        exact = self.merged.stored(self.blocks[stage][index], block)
        if any(value.dtype != checkpoint.dtype(key) for key, value in exact.items()):
            self.exact.write(stage, index, block)
        tensors = {
            source: part.to(checkpoint.dtype(source))
            for key, value in exact.items()
            for source, part in checkpoint.split(key, value).items()
        }
        self.writer.write_shard(self._number(stage, index), tensors)

    def read_into(self, stage: int, index: int, block: nn.Module) -> None:
        """Copy a finished block's calibrated tensors from its shard (or its exact copy) into
        `block` (a copy of the skeleton block, read from the merged checkpoint)."""
        if self.exact.has(stage, index):
            self.exact.read_into(stage, index, block)
            return
        skeleton = self.blocks[stage][index]
        with safe_open(self._file(stage, index), framework="pt") as f:
            stored = {key: f.get_tensor(key) for key in self._stored(skeleton)}
        fused = {k: self.merged.checkpoint.fuse(k, stored) for k in self.merged.stored_keys(skeleton)}
        self.merged.load_stored(skeleton, block, fused)

    def finish(self) -> None:
        """The index, and every file of the merged model that is not a weight (config, model card,
        recipe, tokenizer, processor, chat template, generation config)."""
        self.writer.finish()
        copy_non_weights(self.merged.path, self.directory)

    @property
    def card_source(self) -> Path:
        """The directory whose README.md the output's model card continues: the merged model's."""
        return self.merged.path
