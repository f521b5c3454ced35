"""What a run holds in memory, where its hidden-state streams go, and a refusal when nothing fits.

Per block the run holds: the weights of the merged block, one expert block and the base block;
the statistics (upper bound: every linear module with its own d_in x d_in Gram, cross moment or
right-hand side, the block's sums and one d_in x d_in solve or tuning scratch); one batch's
activations inside a block (estimate); and the streams: per task the student and expert hidden states of every
batch, with the captured block arguments, plus one task's stream being rebuilt.

Streams live on the device, in (pinned) CPU memory or on disk. `auto` takes the first of those
that fits the budgets; with streams off the device, two batches of each stream are on the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from ..errors import FeatCalError
from ..io.offload import PLACEMENTS
from ..models.modules import LINEAR, ModuleKind, calibrated_modules, module_kind, routed_fraction
from ..sizes import human


@dataclass
class MemoryPlan:
    """Bytes of each kind a run holds at once, and where the streams go."""

    device: str
    weights: int
    statistics: int
    activations: int
    streams: int
    batch: int
    placement: str = "device"

    def on_device(self, placement: str | None = None) -> int:
        placement = placement or self.placement
        streams = self.streams if placement == "device" else 2 * self.batch
        return self.weights + self.statistics + self.activations + streams

    def on_cpu(self, placement: str | None = None) -> int:
        """CPU bytes beyond the device's (on a CPU device the device's bytes are CPU bytes)."""
        return self.streams if (placement or self.placement) == "cpu" else 0

    def on_disk(self, placement: str | None = None) -> int:
        return self.streams if (placement or self.placement) == "disk" else 0

    def describe(self) -> str:
        rows = [
            ("weights (merged + expert + base block)", self.weights),
            ("statistics (upper bound)", self.statistics),
            ("one batch's activations (estimate)", self.activations),
            (f"streams ({self.placement})", self.streams),
        ]
        lines = [f"featcal memory plan on {self.device}:"]
        lines += [f"  {name:<42} {human(size):>12}" for name, size in rows]
        totals = f"  total: {human(self.on_device())} on {self.device}"
        if self.placement == "cpu":
            pinned = "pinned " if self.device.startswith("cuda") else ""
            totals += f", {human(self.on_cpu())} in {pinned}CPU memory"
        if self.placement == "disk":
            totals += f", {human(self.on_disk())} on disk"
        return "\n".join([*lines, totals])

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(
    blocks: Iterable[torch.nn.Module],
    block_bytes: int,
    dtype: torch.dtype,
    accumulator: torch.dtype,
    batches: list[tuple[int, int, int]],
    context_bytes: int,
    tasks: int,
    device: torch.device,
    kind_of: ModuleKind = module_kind,
) -> MemoryPlan:
    """The plan's sizes. blocks: the merged model's blocks (shapes only); block_bytes: the largest
    block's weights; batches: (examples, tokens, hidden) of every batch of every task, in the
    model's dtype; context_bytes: the captured block arguments of all batches of all tasks;
    kind_of: the adapter's module kinds."""
    size, acc = dtype.itemsize, accumulator.itemsize
    statistics = activations_per_token = 0
    for block in blocks:
        modules = calibrated_modules(block, kind_of).values()
        linear = [(m.d_in, m.d_out) for m in modules if m.kind == LINEAR]
        stats = sum(2 * d * d + max(d * d, d * o) + d * o for d, o in linear)
        # one d_in x d_in solve, or (never at the same time) the kernels' tuning scratch: one
        # accumulator of the largest Gram or cross moment, on a GPU the first time a shape is seen
        stats += max((max(d * d, d * o) for d, o in linear), default=0)
        statistics = max(statistics, stats * acc)
        width = max((m.d_in for m in modules), default=0)
        share = routed_fraction(block)  # a routed expert's outputs exist for its tokens only
        outputs = sum(m.d_out * (share if m.routed else 1) for m in modules if m.kind == LINEAR)
        activations_per_token = max(activations_per_token, int(2 * outputs) + 4 * width)
    tokens = [n * t for n, t, _ in batches]
    hidden = max((h for _, _, h in batches), default=0)
    stream = sum(tokens) * hidden * size
    largest = max(tokens, default=0) * hidden * size
    return MemoryPlan(
        device=str(device),
        weights=3 * block_bytes,
        statistics=statistics,
        activations=max(tokens, default=0) * activations_per_token * size,
        streams=2 * stream + stream // max(tasks, 1) + context_bytes,
        batch=2 * largest,
    )


def choose_placement(
    plan: MemoryPlan,
    requested: str,
    max_device: int | None,
    max_cpu: int | None,
) -> MemoryPlan:
    """Set plan.placement: `requested`, or for 'auto' the first of device, cpu, disk that fits the
    budgets (None: unbounded). Refuses, naming what would fit, when the budgets cannot hold it."""
    if requested != "auto" and requested not in PLACEMENTS:
        raise FeatCalError(f"stream placement {requested!r} is not one of auto, {', '.join(PLACEMENTS)}")
    on_cpu_device = plan.device == "cpu"
    if on_cpu_device:
        # The device is the CPU: one budget for everything, and 'cpu' is the same as 'device'.
        max_device = max_cpu if max_device is None else min(max_device, max_cpu or max_device)
        max_cpu = None
    candidates = list(PLACEMENTS) if requested == "auto" else [requested]
    if on_cpu_device and requested == "auto":
        candidates.remove("cpu")

    def fits(placement: str) -> bool:
        device_ok = max_device is None or plan.on_device(placement) <= max_device
        return device_ok and (max_cpu is None or plan.on_cpu(placement) <= max_cpu)

    for placement in candidates:
        if fits(placement):
            plan.placement = placement
            return plan
    plan.placement = candidates[-1]
    where = "memory" if on_cpu_device else "GPU memory"
    budget = _budget(max_device, where) + ("" if on_cpu_device else ", " + _budget(max_cpu, "CPU memory"))
    least = plan.on_device("disk")
    if max_device is not None and least > max_device:
        hint = f"with its streams on disk it needs {human(least)} of {where}"
    else:
        hint = f"its streams need {human(plan.streams)} of CPU memory; on disk they would fit"
    raise FeatCalError(
        f"the run does not fit the memory budget ({budget}; streams: {requested}): {hint}. Raise the "
        "budget, use fewer examples per batch, or choose where the streams go.\n" + plan.describe()
    )


def _budget(limit: int | None, what: str) -> str:
    return f"{what} unbounded" if limit is None else f"{human(limit)} of {what}"
