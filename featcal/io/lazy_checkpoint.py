"""Safetensors checkpoints read tensor by tensor, so that no whole model is ever held in memory.

Construction reads only `model.safetensors.index.json` (if sharded) and each shard's JSON header;
tensor data is read by `LazyCheckpoint.read`, one shard file open at a time.
"""

from __future__ import annotations

import difflib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from ..errors import FeatCalError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> torch dtypes; the float8 and wide unsigned types only where torch has them.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in [
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
]:
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


class _Entry(NamedTuple):
    shard: str
    dtype: str  # as named in the header
    shape: tuple[int, ...]
    nbytes: int


class LazyCheckpoint:
    """A checkpoint directory's safetensors tensors, read on demand (featcal never loads a whole model)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            what = "is not a directory" if self.path.exists() else "does not exist"
            raise FeatCalError(f"checkpoint directory {self.path} {what}")
        if (self.path / SINGLE_FILE).is_file():
            shards, index = [SINGLE_FILE], None
        elif (self.path / INDEX_FILE).is_file():
            index = self._read_index()
            shards = sorted(set(index.values()))
        else:
            raise FeatCalError(
                f"{self.path} holds neither {SINGLE_FILE} nor {INDEX_FILE}: featcal reads safetensors "
                "checkpoints (convert .bin weights with save_pretrained(safe_serialization=True))"
            )
        self._shards = shards
        self._entries: dict[str, _Entry] = {}
        for shard in shards:
            for name, entry in self._read_header(shard).items():
                if name in self._entries:
                    raise FeatCalError(
                        f"{self.path}: tensor {name!r} is in both {self._entries[name].shard} and {shard}"
                    )
                if index is not None and name not in index:
                    raise FeatCalError(f"{self.path}: {shard} holds tensor {name!r}, not in {INDEX_FILE}")
                self._entries[name] = entry
        for name, shard in (index or {}).items():
            entry = self._entries.get(name)
            if entry is None or entry.shard != shard:
                found = f" ({entry.shard} holds it)" if entry else ""
                raise FeatCalError(
                    f"{self.path}: {INDEX_FILE} puts tensor {name!r} in {shard}, but that shard's header "
                    f"does not list it{found}"
                )

    def _read_index(self) -> dict[str, str]:
        """The index's weight map (tensor name -> shard file name), each shard checked to exist."""
        file = self.path / INDEX_FILE
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise FeatCalError(f"{file} is not a valid safetensors index: {err}") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FeatCalError(f"{file}: weight_map must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise FeatCalError(f"{file} references shard {shard}, which does not exist in {self.path}")
        return weight_map

    def _read_header(self, shard: str) -> dict[str, _Entry]:
        """The tensors listed in a shard's header, in header order; checks that their data fits the file."""
        file = self.path / shard
        header, _ = read_header(file)
        return {
            name: _Entry(
                shard, info["dtype"], tuple(info["shape"]), info["data_offsets"][1] - info["data_offsets"][0]
            )
            for name, info in header.items()
            if name != "__metadata__"
        }

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            hint = self._close_name(key)
            hint = f" (did you mean {hint!r}?)" if hint else ""
            raise FeatCalError(f"no tensor {key!r} in checkpoint {self.path}{hint}")
        return entry

    def _close_name(self, key: str) -> str | None:
        """A stored name that ends with `key` or that `key` ends with, else a near spelling, else None."""
        for name in self._entries:
            if name.endswith("." + key) or key.endswith("." + name):
                return name
        close = difflib.get_close_matches(key, self._entries, n=1, cutoff=0.8)
        return close[0] if close else None

    def keys(self) -> list[str]:
        """Every tensor name, in shard order and then header order."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of `key`, from its header."""
        entry = self._entry(key)
        if entry.dtype not in _DTYPES:
            raise FeatCalError(
                f"tensor {key!r} in {self.path / entry.shard} has dtype {entry.dtype}, "
                f"which this torch {torch.__version__} cannot represent"
            )
        return _DTYPES[entry.dtype]

    def nbytes(self, keys: Iterable[str] | None = None) -> int:
        """Bytes on disk of the tensors `keys` (of every tensor if None)."""
        names = self._entries if keys is None else keys
        return sum(self._entry(k).nbytes for k in names)

    def shard_of(self, key: str) -> str:
        """File name (within `path`) of the shard holding `key`."""
        return self._entry(key).shard

    def read(
        self, keys: Iterable[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors `keys`, in that order, on `device`; cast to `dtype` if given, else as stored.

        Shards are opened one at a time, each closed before the next. On the CPU the tensors returned
        may be copy-on-write views of the memory-mapped shard: writing to them never changes the file.
        """
        keys = list(keys)
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self._entry(key).shard, []).append(key)
        device = torch.device(device)
        # safetensors accepts "cpu" but not "cpu:0".
        where = "cpu" if device.type == "cpu" else str(device)
        tensors = {}
        for shard, names in by_shard.items():
            with safe_open(self.path / shard, framework="pt", device=where) as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    tensors[name] = tensor if dtype is None else tensor.to(dtype)
        return {k: tensors[k] for k in keys}

    def files(self) -> list[str]:
        """The shard file names (within `path`), sorted."""
        return sorted(self._shards)

    @staticmethod
    def holds_safetensors(path: str | os.PathLike) -> bool:
        """True if the directory `path` has model.safetensors or model.safetensors.index.json."""
        path = Path(path)
        return (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()

    def __repr__(self) -> str:
        return f"LazyCheckpoint({str(self.path)!r}, {len(self._entries)} tensors)"


def read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> {dtype, shape, data_offsets}, and
    "__metadata__") and the offset where its data starts; every entry checked to lie in the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            if size < 8:
                raise ValueError(f"file is {size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            shape_ok = all(isinstance(n, int) and n >= 0 for n in info["shape"])
            if not isinstance(info["dtype"], str) or not shape_ok or not 0 <= start <= end:
                raise ValueError(f"bad entry for tensor {name!r}: {info}")
            if 8 + length + end > size:
                raise ValueError(f"data of tensor {name!r} ends past the end of the file ({size} bytes)")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise FeatCalError(f"corrupt or truncated safetensors header in {file}: {err}") from err
    return header, 8 + length
