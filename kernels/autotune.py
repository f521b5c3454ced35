"""Tile configurations and the tuner that picks one per problem key.

Triton's own autotuner times every config with the caller's arguments, so a kernel that adds
into its output needs `restore_value`, which clones the output inside every timed call; it
compiles every config, including those that cannot fit the device's shared memory, and it
cannot be tested without a GPU. This tuner instead

- drops the configs whose shared memory, as `TileConfig.shared_memory` bounds it, exceeds the
  device's opt-in limit per block (`SHARED_MEMORY_LIMIT` for ahead-of-time targets);
- times the rest once per key through a `trial` that adds into scratch accumulators the
  caller allocated once, never the caller's output (a config that still fails to launch is
  skipped);
- remembers the choice per key, so later calls (a ragged last batch included: the row count
  is not part of the key) launch the chosen config directly.

Its timer and its shared-memory limit are arguments, so its bookkeeping is tested on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

# Opt-in shared memory per thread block, bytes, by compute capability (CUDA programming guide,
# "Features and technical specifications"): A100 163 KiB, H100/H200 227 KiB, sm_86/89 99 KiB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class TileConfig:
    """One tiling of the (rows of x) x (rows of y) output over a K-loop of BLOCK_K rows."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict[str, int]:
        """The kernel's tile constexprs."""
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "SPLIT_K": self.split_k,
        }

    def shared_memory(self, x_bytes: int, y_bytes: int, *, float32_dot: bool) -> int:
        """An upper bound, in bytes, on the shared memory of this config's compiled kernel.

        The software pipeline keeps num_stages buffers of the x tile (BLOCK_K x BLOCK_M) and the
        y tile (BLOCK_K x BLOCK_N) in their input dtypes, and 1 KiB holds barriers and weights. A
        float32 dot (float32 or upcast operands) also stages one float32 tile of the larger
        width. Triton 3.9 reaches the bound on sm_90 and stays below it on sm_80;
        `featcal.kernels.compile_check` checks it against every compiled config.
        """
        staged = self.num_stages * self.block_k * (self.block_m * x_bytes + self.block_n * y_bytes)
        converted = 4 * self.block_k * max(self.block_m, self.block_n) if float32_dot else 0
        return staged + converted + 1024


# What a config that cannot run on this device raises at its first launch (the tuner skips it).
LAUNCH_FAILURES: tuple[type[Exception], ...] = (OutOfResources, CompilationError)


def gpu_time(trial: Callable[[], None], warmup: int = 2, repeat: int = 7) -> float:
    """Median milliseconds of trial() between CUDA events on the current stream (no scratch
    allocation beyond the trial's own, unlike triton.testing.do_bench's cache flush)."""
    for _ in range(warmup):
        trial()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        trial()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def device_shared_memory(device: torch.device) -> int | None:
    """The opt-in shared memory per block of a CUDA device; None (no limit) elsewhere."""
    if device.type != "cuda":
        return None
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])


def fitting(
    configs: Sequence[TileConfig], limit: int | None, x_bytes: int, y_bytes: int, *, float32_dot: bool
) -> list[TileConfig]:
    """The configs whose shared-memory bound is within `limit` (all of them when None)."""
    bound = lambda c: c.shared_memory(x_bytes, y_bytes, float32_dot=float32_dot)  # noqa: E731
    return [c for c in configs if limit is None or bound(c) <= limit]


@dataclass
class Tuner:
    """Picks, per key, the fastest of the candidate configs (see the module docstring)."""

    timer: Callable[[Callable[[], None]], float] = gpu_time
    failures: tuple[type[Exception], ...] = ()  # a trial raising one of these is not a candidate
    chosen: dict[Hashable, TileConfig] = field(default_factory=dict)
    timings: dict[Hashable, dict[TileConfig, float]] = field(default_factory=dict)

    def choose(
        self,
        key: Hashable,
        candidates: Callable[[], Sequence[TileConfig]],
        trial: Callable[[TileConfig], None],
    ) -> TileConfig:
        """The config for `key`: remembered, else the only candidate or the fastest trial
        (`candidates` is asked only for a new key). A trial that raises one of `failures` (the
        config does not fit this device after all) is timed as never finishing."""
        if key in self.chosen:
            return self.chosen[key]
        configs = list(candidates())
        if not configs:
            raise RuntimeError(f"no tile configuration fits the device for {key}")
        if len(configs) == 1:
            self.chosen[key] = configs[0]
            return configs[0]
        times = {c: self._time(trial, c) for c in configs}
        if all(t == math.inf for t in times.values()):
            raise RuntimeError(f"no tile configuration could be launched for {key}")
        self.timings[key] = times
        self.chosen[key] = min(configs, key=times.__getitem__)
        return self.chosen[key]

    def _time(self, trial: Callable[[TileConfig], None], config: TileConfig) -> float:
        try:
            return self.timer(lambda: trial(config))
        except self.failures:
            return math.inf
