"""The calibrated checkpoint of a streamed run, written while the run goes.

The merged checkpoint's tensors outside the blocks (embeddings, final norm, heads, anything the
model does not know) are copied first, one source shard at a time; each block is written as
its own shard as soon as it is calibrated, in the checkpoint's stored dtypes and names; the
index, config.json and the tokenizer / processor files come last. The caller writes into a
temporary directory and renames it when the run succeeds.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.lazy_model import LazyModel
from .checkpoint import copy_companions
from .sharded_writer import ShardedWriter


class OutputCheckpoint:
    """Writes the calibrated model into `directory`: `write` each block, then `finish`."""

    def __init__(self, merged: LazyModel, blocks: list[list[nn.Module]], directory: Path) -> None:
        self.merged, self.blocks, self.directory = merged, blocks, Path(directory)
        checkpoint = merged.checkpoint
        in_blocks = {key for stage in blocks for block in stage for key in merged.stored_keys(block)}
        rest: dict[str, list[str]] = {}
        for key in checkpoint.keys():
            if key not in in_blocks:
                rest.setdefault(checkpoint.shard_of(key), []).append(key)
        self.first_block = len(rest)
        self.offsets = [sum(len(s) for s in blocks[:k]) for k in range(len(blocks))]
        self.writer = ShardedWriter(directory, len(rest) + sum(len(s) for s in blocks))
        for number, keys in enumerate(rest.values()):
            self.writer.write_shard(number, checkpoint.read(keys))

    def write(self, stage: int, index: int, block: nn.Module) -> None:
        """Write a calibrated block (a copy of skeleton block `index` of `stage`) as its shard."""
        tensors = self.merged.stored(self.blocks[stage][index], block)
        self.writer.write_shard(self.first_block + self.offsets[stage] + index, tensors)

    def finish(self) -> None:
        """The index, and config.json, generation and tokenizer / processor files of the merged model."""
        self.writer.finish()
        copy_companions(self.merged.path, self.directory, config=True)
