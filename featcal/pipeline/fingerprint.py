"""Fingerprints of a run's inputs: what every process of one run must agree on before any work.

Each part is a short digest: the featcal version, the settings that change results, the tasks,
each task's calibration data (every tensor's name, dtype, shape and bytes) and the shapes of
the merged and base models (parameter names, shapes, dtypes). Settings that only say where or
how fast a process works (memory budgets, stream placement, progress) may differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor

from ..config import FeatCalConfig
from ..models.sources import ModelSource

LOCAL_SETTINGS = frozenset(
    {"progress", "offload_dir", "max_gpu_memory", "max_cpu_memory", "stream_placement"}
    | {"distributed", "distributed_timeout"}
)


def run_fingerprint(
    config: FeatCalConfig,
    batches: Mapping[str, list],
    merged: ModelSource,
    base: ModelSource,
) -> dict[str, str]:
    """Part name (as messages say it) -> digest."""
    from .. import __version__

    settings = {k: v for k, v in config.to_dict().items() if k not in LOCAL_SETTINGS}
    parts = {
        "featcal version": _digest(__version__),
        "settings": _digest(repr(sorted(settings.items()))),
        "tasks": _digest(repr(list(batches))),
    }
    for task, task_batches in batches.items():
        parts[f"calibration data of task {task!r}"] = data_digest(task_batches)
    parts["merged model's shapes"] = model_digest(merged)
    parts["base model's shapes"] = model_digest(base)
    return parts


def data_digest(batches: list) -> str:
    """Digest of a task's batches: every tensor's key, dtype, shape and bytes, in order."""
    h = hashlib.blake2b(digest_size=16)
    for i, batch in enumerate(batches):
        items = batch.items() if isinstance(batch, Mapping) else [("", batch)]
        for key, value in sorted(items, key=lambda kv: kv[0]):
            h.update(f"{i}/{key}".encode())
            if isinstance(value, Tensor):
                h.update(f"{value.dtype}{tuple(value.shape)}".encode())
                h.update(_bytes(value))
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def model_digest(source: ModelSource) -> str:
    """Digest of a model's parameter names, shapes and dtypes (a lazy model's, as it will load)."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in source.model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{source.dtype if source.lazy else p.dtype};".encode())
    return h.hexdigest()


def first_difference(mine: Mapping[str, str], theirs: Mapping[str, str]) -> str | None:
    """The first part on which two fingerprints differ (None when they agree)."""
    for part in list(mine) + [p for p in theirs if p not in mine]:
        if mine.get(part) != theirs.get(part):
            return part
    return None


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _bytes(value: Tensor) -> memoryview:
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())
