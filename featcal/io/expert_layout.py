"""MoE checkpoints as transformers 5 models see them: fused expert tensors over per-expert files.

Checkpoints (the hub's, and transformers 5's own `save_pretrained`) store every routed expert
apart, `...experts.{e}.{gate}.weight`, `.{up}.` and `.{down}.` (Mixtral: `block_sparse_moe`
with w1, w3, w2), while a transformers 5 model holds them fused: `mlp.experts.gate_up_proj`
(E, 2I, H), gate rows then up rows, and `mlp.experts.down_proj` (E, H, I). `ExpertLayout` gives a
checkpoint under the model's names: a fused key is read as its per-expert tensors stacked, and
`split` turns a fused tensor back into the checkpoint's own keys, so a calibrated block is
written in the layout it came in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import FeatCalError
from .lazy_checkpoint import LazyCheckpoint

_FUSED = re.compile(r"^(?P<block>.*)\.mlp\.experts\.(?P<part>gate_up_proj|down_proj)$")
_MLP = re.compile(r"^(?P<block>.*)\.mlp\.(?P<rest>.*)$")


class ExpertNames(NamedTuple):
    """How a checkpoint names one expert's three maps, under `module` of a block."""

    module: str
    gate: str
    up: str
    down: str


LAYOUTS = (
    ExpertNames("mlp", "gate_proj", "up_proj", "down_proj"),  # Qwen2-MoE, Qwen3-MoE, OLMoE
    ExpertNames("block_sparse_moe", "w1", "w3", "w2"),  # Mixtral
)


class ExpertLayout:
    """A LazyCheckpoint read (and written back) under a transformers 5 MoE model's tensor names;
    every other key is the checkpoint's own."""

    def __init__(self, checkpoint: LazyCheckpoint) -> None:
        self.checkpoint = checkpoint
        self._sources: dict[str, list[str] | None] = {}

    def __getattr__(self, name: str):
        return getattr(self.checkpoint, name)

    def sources(self, key: str) -> list[str] | None:
        """The checkpoint's keys that `key` is read from (itself when stored), or None."""
        if key not in self._sources:
            self._sources[key] = self._find(key)
        return self._sources[key]

    def _find(self, key: str) -> list[str] | None:
        if key in self.checkpoint:
            return [key]
        fused = _FUSED.match(key)
        if fused:
            for names in LAYOUTS:
                prefix = f"{fused['block']}.{names.module}.experts"
                parts = (names.gate, names.up) if fused["part"] == "gate_up_proj" else (names.down,)
                count = 0
                while f"{prefix}.{count}.{parts[0]}.weight" in self.checkpoint:
                    count += 1
                keys = [f"{prefix}.{e}.{p}.weight" for p in parts for e in range(count)]
                if count and all(k in self.checkpoint for k in keys):
                    return keys
                if count:
                    missing = next(k for k in keys if k not in self.checkpoint)
                    raise FeatCalError(
                        f"the checkpoint {self.checkpoint.path} holds {key!r} expert by expert but has no "
                        f"tensor {missing!r}"
                    )
        renamed = _MLP.match(key)
        if renamed and f"{renamed['block']}.block_sparse_moe.{renamed['rest']}" in self.checkpoint:
            return [f"{renamed['block']}.block_sparse_moe.{renamed['rest']}"]
        return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.sources(key) is not None

    def _stored_as_is(self, key: str) -> bool:
        """Whether `key` is one tensor of the checkpoint (its own, or renamed), not a fusion."""
        sources = self.sources(key)
        return sources == [key] or not _FUSED.match(key)

    def shape(self, key: str) -> tuple[int, ...]:
        sources = self.sources(key)
        first = tuple(self.checkpoint.shape(sources[0]))
        if self._stored_as_is(key):
            return first
        if key.endswith("gate_up_proj"):
            return (len(sources) // 2, 2 * first[0], first[1])
        return (len(sources), *first)

    def dtype(self, key: str) -> torch.dtype:
        return self.checkpoint.dtype(self.sources(key)[0])

    def nbytes(self, keys: Iterable[str] | None = None) -> int:
        if keys is None:
            return self.checkpoint.nbytes()
        return self.checkpoint.nbytes([s for k in keys for s in self.sources(k)])

    def read(
        self, keys: Iterable[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, Tensor]:
        keys = list(keys)
        stored = self.checkpoint.read(
            list(dict.fromkeys(s for k in keys for s in self.sources(k))), device=device, dtype=dtype
        )
        return {k: self.fuse(k, stored) for k in keys}

    def fuse(self, key: str, stored: Mapping[str, Tensor]) -> Tensor:
        """The tensor `key` from the checkpoint's tensors `stored` (holding its sources)."""
        sources = self.sources(key)
        if self._stored_as_is(key):
            return stored[sources[0]]
        if key.endswith("gate_up_proj"):
            half = len(sources) // 2
            gate = torch.stack([stored[s] for s in sources[:half]])
            up = torch.stack([stored[s] for s in sources[half:]])
            return torch.cat([gate, up], dim=1)
        return torch.stack([stored[s] for s in sources])

    def split(self, key: str, value: Tensor) -> dict[str, Tensor]:
        """The inverse of `fuse`: `value` of `key` under the checkpoint's own keys."""
        sources = self.sources(key)
        if self._stored_as_is(key):
            return {sources[0]: value}
        if key.endswith("gate_up_proj"):
            gate, up = value.chunk(2, dim=1)
            parts = [*gate.unbind(0), *up.unbind(0)]
        else:
            parts = list(value.unbind(0))
        return {s: p.contiguous() for s, p in zip(sources, parts)}
