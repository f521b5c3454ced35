"""The demo's benchmark: tasks built from scikit-learn's bundled handwritten digits.

The 1,797 8x8 digit images that scikit-learn ships are split once (seeded) into a training and
a held-out test set. Each task changes the images (rotate, mirror, invert, shift, ...) and asks
its own question of them (which digit, its parity, its range, ...), so the tasks differ in
their inputs and in their labels, and each expert needs a head of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FeatCalError

IMAGE_SIZE = 8


@dataclass(frozen=True)
class Task:
    """A task: `transform` maps images (N, 8, 8) in [0, 1] to the task's images, `label` maps
    digits (N,) to the task's classes 0..classes-1."""

    name: str
    description: str
    transform: Callable[[Tensor], Tensor]
    label: Callable[[Tensor], Tensor]
    classes: int


def translate(images: Tensor, down: int, right: int) -> Tensor:
    """Move every image by (down, right) pixels, each in -1..1, filling with background (0)."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    return padded[..., 1 - down : 1 - down + IMAGE_SIZE, 1 - right : 1 - right + IMAGE_SIZE]


def _same(x: Tensor) -> Tensor:
    return x


def _rotate(x: Tensor) -> Tensor:
    return torch.rot90(x, 1, dims=(-2, -1))


def _mirror(x: Tensor) -> Tensor:
    return torch.flip(x, (-1,))


def _upside_down(x: Tensor) -> Tensor:
    return torch.flip(x, (-2,))


def _invert(x: Tensor) -> Tensor:
    return 1 - x


def _shift(x: Tensor) -> Tensor:
    return translate(x, 1, 1)


def _transpose(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _invert_rotate_back(x: Tensor) -> Tensor:
    return 1 - torch.rot90(x, -1, dims=(-2, -1))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("digits", "upright; which digit", _same, _same, 10),
        Task("rotated", "rotated 90 degrees; which digit", _rotate, _same, 10),
        Task("mirrored", "mirrored left-right; which digit", _mirror, _same, 10),
        Task("inverted", "inverted intensities; which digit", _invert, _same, 10),
        Task("parity", "upside down; odd or even", _upside_down, lambda y: y % 2, 2),
        Task("range", "shifted one pixel; 0-3, 4-6 or 7-9", _shift, lambda y: y * 3 // 10, 3),
        Task("mod3", "transposed; digit mod 3", _transpose, lambda y: y % 3, 3),
        Task("large", "inverted, rotated -90 degrees; digit >= 5", _invert_rotate_back, lambda y: y // 5, 2),
    )
}


@dataclass
class Split:
    """Images (N, 8, 8) in [0, 1] and digits (N,) of the training and the held-out test set."""

    train_images: Tensor
    train_digits: Tensor
    test_images: Tensor
    test_digits: Tensor


def load_digits_split(test_size: int, seed: int) -> Split:
    """scikit-learn's digits (read from the installed package, no download), split at random."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise FeatCalError(
            "featcal demo needs scikit-learn (its bundled digits are the demo's data): "
            "pip install 'featcal[demo]'"
        ) from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    if not 0 < test_size < len(images):
        raise FeatCalError(f"test_size must be between 1 and {len(images) - 1}, got {test_size}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return Split(images[train], labels[train], images[test], labels[test])


def select_tasks(names: Sequence[str]) -> list[Task]:
    """The named tasks, in the given order; unknown or repeated names are refused."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise FeatCalError(f"unknown demo task(s) {unknown}; the tasks are {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise FeatCalError(f"a demo task is named twice in {list(names)}")
    if not names:
        raise FeatCalError("the demo needs at least one task")
    return [TASKS[n] for n in names]


def pixel_values(images: Tensor) -> Tensor:
    """Images (N, 8, 8) in [0, 1] as the encoder's input (N, 1, 8, 8) in [-1, 1]."""
    return (images * 2 - 1).unsqueeze(1)


def task_inputs(task: Task, images: Tensor, digits: Tensor) -> tuple[Tensor, Tensor]:
    """The task's encoder inputs and labels for these images."""
    return pixel_values(task.transform(images)), task.label(digits)


def _training_order(task: Task, split: Split, seed: int) -> Tensor:
    """The task's training images in a random order (seeded per task): calibration draws take
    them from the front, validation images from the back."""
    generator = torch.Generator().manual_seed(seed + sum(map(ord, task.name)))
    return torch.randperm(len(split.train_images), generator=generator)


def calibration_inputs(task: Task, split: Split, count: int, seed: int, reserved: int = 0) -> Tensor:
    """`count` unlabeled training images of the task, drawn at random (seeded per task), none of
    them among the last `reserved` of its order (the validation images)."""
    available = len(split.train_images) - reserved
    if not 1 <= count <= available:
        raise FeatCalError(
            f"task {task.name!r}: {count} calibration examples asked for, the training split "
            f"holds {available}{' besides the validation images' if reserved else ''} (choose 1..{available})"
        )
    chosen = _training_order(task, split, seed)[:count]
    return pixel_values(task.transform(split.train_images[chosen]))


def validation_inputs(task: Task, split: Split, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """`count` labeled training images of the task that no calibration draw of `calibration_inputs`
    with reserved=count uses: the inputs and labels on which `--tune` scores."""
    chosen = _training_order(task, split, seed)[len(split.train_images) - count :]
    return task_inputs(task, split.train_images[chosen], split.train_digits[chosen])
