"""Fingerprints of a run's inputs, as dicts of part name (as messages say it) -> short digest.

`run_fingerprint` is what every process of one run must agree on before any work: the featcal
version, the settings that change results, the tasks, each task's calibration data (every
tensor's name, dtype, shape and bytes) and the shapes of the merged and base models. Settings
that only say where or how fast a process works (memory budgets, stream placement, progress)
may differ.

`input_fingerprint` is what a resumed run must share with the run that wrote its partial
output: the tasks, the data, and every model by `source_digest`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from torch import Tensor

from ..config import FeatCalConfig
from ..io.lazy_checkpoint import read_header
from ..models.sources import ModelSource

SAMPLES, SAMPLE_BYTES = 64, 4096

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


def input_fingerprint(
    batches: Mapping[str, list], merged: ModelSource, base: ModelSource, experts: Mapping[str, str]
) -> dict[str, str]:
    """The tasks, each task's data, and the merged, base and (`experts`: task -> `source_digest`)
    expert models."""
    parts = {"tasks": _digest(repr(list(batches)))}
    for task, task_batches in batches.items():
        parts[f"calibration data of task {task!r}"] = data_digest(task_batches)
    parts["merged model"] = source_digest(merged)
    parts["base model"] = source_digest(base)
    for task in batches:
        parts[f"expert {task!r}"] = experts[task]
    return parts


def source_digest(source: ModelSource) -> str:
    """Digest of a model. A checkpoint read lazily: its config.json, and each shard's name, size,
    header (names, dtypes, shapes, offsets, metadata) and SAMPLES pieces of SAMPLE_BYTES spread
    evenly over its data. A module: each parameter's name, shape, dtype and SAMPLES * 16 (1024)
    of its values, evenly spaced (all of a smaller one). Cheap for any size; an edit that keeps
    all of these is missed."""
    h = hashlib.blake2b(digest_size=16)
    if source.lazy is not None:
        checkpoint = source.lazy.checkpoint
        config = checkpoint.path / "config.json"
        h.update(config.read_bytes() if config.is_file() else b"")
        for name in checkpoint.files():
            file = checkpoint.path / name
            header, start = read_header(file)
            size = file.stat().st_size
            h.update(f"{name};{size};{json.dumps(header, sort_keys=True)}".encode())
            with open(file, "rb") as f:
                for k in range(SAMPLES):
                    f.seek(start + (size - start) * k // SAMPLES)
                    h.update(f.read(SAMPLE_BYTES))
        return h.hexdigest()
    for name, p in source.model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // (SAMPLES * 16))
        h.update(f"{name}{tuple(p.shape)}{p.dtype};".encode())
        h.update(_bytes(flat[::step][: SAMPLES * 16]))
    return h.hexdigest()


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
