"""Writing a safetensors checkpoint shard by shard, so that no whole model need be held in memory.

Every file is written under a temporary name in the target directory and renamed into place, so a
crash never leaves a partial shard or index under its final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import FeatCalError
from .atomic_file import atomic_file
from .lazy_checkpoint import read_header

INDEX_FILE = "model.safetensors.index.json"


class ShardedWriter:
    """Writes a safetensors checkpoint into `directory` shard by shard, then its index."""

    def __init__(
        self, directory: str | os.PathLike, num_shards: int, metadata: dict[str, str] | None = None
    ) -> None:
        """`metadata` goes into every shard's header; "format": "pt" is added unless given."""
        if num_shards < 1:
            raise FeatCalError(f"num_shards must be at least 1, got {num_shards}")
        metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise FeatCalError(f"safetensors metadata must map str to str, got {metadata}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.num_shards = num_shards
        self.metadata = metadata
        self._weight_map: dict[str, str] = {}  # tensor name -> shard file name
        self._written: set[int] = set()
        self._total_size = 0

    def shard_name(self, number: int) -> str:
        """File name of shard `number` (0-based): "model-00001-of-00005.safetensors", or
        "model.safetensors" when there is one shard."""
        if not 0 <= number < self.num_shards:
            raise FeatCalError(f"shard number {number} is out of range 0..{self.num_shards - 1}")
        if self.num_shards == 1:
            return "model.safetensors"
        return f"model-{number + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def write_shard(self, number: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write shard `number` (0-based) holding `tensors`; each shard once, each name in one shard."""
        name = self.shard_name(number)
        if number in self._written:
            raise FeatCalError(f"shard {name} was already written to {self.directory}")
        for key in tensors:
            if key in self._weight_map:
                raise FeatCalError(
                    f"tensor {key!r} of shard {name} was already written in shard {self._weight_map[key]}"
                )
        sizes = save_tensors(self.directory / name, tensors, self.metadata)
        self._add(number, sizes)

    def adopt_shard(self, number: int, keys: Collection[str]) -> bool:
        """Count shard `number` as written if its file is already there, whole, holding exactly
        `keys` (a resumed run's shards); False, and nothing counted, if not."""
        file = self.directory / self.shard_name(number)
        try:
            header, _ = read_header(file)
        except (FeatCalError, OSError):
            return False
        header.pop("__metadata__", None)
        if set(header) != set(keys) or number in self._written:
            return False
        self._add(number, {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()})
        return True

    def _add(self, number: int, sizes: dict[str, int]) -> None:
        self._written.add(number)
        for key, nbytes in sizes.items():
            self._weight_map[key] = self.shard_name(number)
            self._total_size += nbytes

    def finish(self) -> dict:
        """The index {"metadata": {"total_size": bytes}, "weight_map": {name: file}}, names sorted;
        written to model.safetensors.index.json when there is more than one shard."""
        missing = [self.shard_name(n) for n in range(self.num_shards) if n not in self._written]
        if missing:
            raise FeatCalError(f"cannot finish {self.directory}: shards not written: {', '.join(missing)}")
        index = {
            "metadata": {"total_size": self._total_size},
            "weight_map": dict(sorted(self._weight_map.items())),
        }
        if self.num_shards > 1:
            text = json.dumps(index, indent=2) + "\n"
            with atomic_file(self.directory / INDEX_FILE) as tmp:
                tmp.write_text(text)
        return index


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, int]:
    """Write `tensors` as one safetensors file, durably (`atomic_file`); their sizes in bytes."""
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights): save a copy instead.
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensor = tensor.clone()
        storages.add(storage)
        prepared[key] = tensor
    sizes = {key: t.numel() * t.element_size() for key, t in prepared.items()}
    with atomic_file(path, sum(sizes.values())) as tmp:
        save_file(prepared, tmp, metadata=metadata)
    return sizes
