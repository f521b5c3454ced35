"""The demo's `--tune`: FeatCal's knobs picked by a coordinate sweep on validation images.

Starting from the given config, each knob in turn (lambda, then rho, then alpha) takes the value
of its grid with the best average validation accuracy, the others held; rounds repeat until one
changes nothing (at most `rounds`). The validation images are training images that no
calibration draw uses; the test images are never seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..config import FeatCalConfig

GRID: dict[str, tuple[float, ...]] = {
    "lambda_ratio": (0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.3),
    "anchor_blend_rho": (1.0, 1.5, 2.2, 3.0, 4.0, 5.0),
    "teacher_interp_alpha": (0.0, 0.25, 0.5, 0.75, 1.0),
}


@dataclass
class Tuning:
    """The knobs the sweep chose, their validation accuracy, and every configuration it tried."""

    chosen: dict[str, float]
    validation: float
    trials: list[dict] = field(default_factory=list)  # the knobs and "validation", in the order tried
    seconds: float = 0.0


def coordinate_sweep(
    evaluate: Callable[[FeatCalConfig], float],
    start: FeatCalConfig,
    grid: dict[str, tuple[float, ...]] = GRID,
    rounds: int = 2,
) -> Tuning:
    """The sweep described above; `evaluate(config)` is the average validation accuracy of a
    calibration with `config`. A tie keeps the current value; each configuration runs once."""
    scores: dict[tuple, float] = {}
    trials: list[dict] = []

    def score(knobs: dict[str, float]) -> float:
        key = tuple(knobs[name] for name in grid)
        if key not in scores:
            scores[key] = evaluate(replace(start, **knobs))
            trials.append({**knobs, "validation": scores[key]})
        return scores[key]

    current = {name: getattr(start, name) for name in grid}
    best = score(current)
    for _ in range(rounds):
        changed = False
        for name, values in grid.items():
            for value in values:
                candidate = {**current, name: value}
                result = score(candidate)
                if result > best:
                    current, best, changed = candidate, result, True
        if not changed:
            break
    return Tuning(current, best, trials)
