"""Calibration data files: one safetensors file per task holding the model's inputs.

A file holds `pixel_values` (N, 3, H, W) for vision models, or `input_ids` (N, T) with
`attention_mask` (N, T) (and optionally `token_type_ids`) for text models; every tensor has the
N examples along its first dimension.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import FeatCalError
from .atomic_file import atomic_file

INPUT_KEYS = ("pixel_values", "input_ids")


class CalibrationData(list):
    """A task's batches read from a data file: a list of batches (dicts of keyword inputs) that
    also says which file they came from (`path`, as given)."""

    def __init__(self, batches: Iterable[dict[str, Tensor]], path: Path) -> None:
        super().__init__(batches)
        self.path = path


def load_calibration_file(path: str | os.PathLike, batch_size: int) -> CalibrationData:
    """The examples of a data file, as batches of `batch_size`; an error naming the file when it
    is missing, unreadable, truncated or not a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FeatCalError(f"no such data file: {path}")
    if batch_size < 1:
        raise FeatCalError(f"batch size must be >= 1, got {batch_size}")
    try:
        tensors = load_file(path)
    except SafetensorError as err:
        raise FeatCalError(
            f"data file {path} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    except OSError as err:
        raise FeatCalError(f"could not read data file {path}: {err.strerror or err}") from None
    if not any(key in tensors for key in INPUT_KEYS):
        raise FeatCalError(
            f"data file {path} holds tensors {sorted(tensors)}; it needs pixel_values, or "
            "input_ids with attention_mask"
        )
    counts = {key: t.shape[0] if t.dim() else None for key, t in tensors.items()}
    if len(set(counts.values())) != 1:
        raise FeatCalError(f"data file {path}: tensors disagree on the number of examples: {counts}")
    count = next(iter(counts.values()))
    if not count:
        raise FeatCalError(f"data file {path} holds no examples")
    batches = ({k: v[i : i + batch_size] for k, v in tensors.items()} for i in range(0, count, batch_size))
    return CalibrationData(batches, path)


def save_calibration_file(path: str | os.PathLike, inputs: Mapping[str, Tensor]) -> None:
    """Write model inputs (e.g. a processor's output) as a calibration data file."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in inputs.items()}, tmp)
