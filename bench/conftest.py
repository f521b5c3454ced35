"""The benchmarks' summary table: per row the median time, the useful TFLOP/s, the share of a
plain torch.matmul's rate in the same dtype on the same device, measured in the same run, the
speed-up over the row named `reference`, where measured the peak memory above the inputs, and
on a GPU of bench/roofline.py's table the share of the roofline's floor that the row reached
(rows that give their fewest bytes)."""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# FEATCAL_BENCH_MEMORY=1 measures CPU peak memory: MKL's buffer cache is turned off, and blocks
# of 64 KiB and more map and unmap their own pages, so that freed memory leaves the resident set
# and scratch space shows in its high-water mark. Both slow allocation: times from such a run
# are not comparable.
CPU_MEMORY = os.environ.get("FEATCAL_BENCH_MEMORY") == "1"
if CPU_MEMORY:
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD

import torch  # noqa: E402
from roofline import current_device  # noqa: E402


def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Median flop/s of a square torch.matmul (8192 on a GPU, 2048 on a CPU)."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(12 if device.type == "cuda" else 4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times[1:])[len(times[1:]) // 2]


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Peak memory above what was in use before, during one call of fn (its result included).

    CUDA: the caching allocator's peak. CPU, with FEATCAL_BENCH_MEMORY=1: the process's resident
    high-water mark, reset through /proc/self/clear_refs (Linux); else None.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not CPU_MEMORY:
        return None
    status = Path("/proc/self/status")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")

    def field(name: str) -> int:
        return int(re.search(rf"^{name}:\s+(\d+) kB", status.read_text(), re.M).group(1)) * 1024

    before = field("VmRSS")
    fn()
    return field("VmHWM") - before


@dataclass(frozen=True)
class Row:
    case: str
    impl: str
    seconds: float
    flops: float
    dtype: torch.dtype
    extra_bytes: int | None  # peak memory above the inputs
    floor: float | None  # the roofline's seconds
    error: float | None  # relative to float64


class Summary:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.peaks: dict[torch.dtype, float] = {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = current_device()

    def add(
        self,
        case: str,
        impl: str,
        seconds: float,
        flops: float,
        dtype: torch.dtype,
        extra_bytes: int | None = None,
        *,
        nbytes: float | None = None,
        precision: str = "ieee",
        error: float | None = None,
    ) -> None:
        """One row; `nbytes` (the fewest bytes the work must move) adds its roofline floor,
        `error` the row's relative error against float64."""
        if dtype not in self.peaks:
            self.peaks[dtype] = matmul_rate(dtype, self.device)
        floor = None
        if self.model is not None and nbytes is not None:
            floor = self.model.floor(flops, nbytes, dtype, precision)
        self.rows.append(Row(case, impl, seconds, flops, dtype, extra_bytes, floor, error))

    def lines(self) -> list[str]:
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        out = [f"device: {name}; torch {torch.__version__}"]
        if self.model is not None:
            out.append(f"roofline: {self.model.name} datasheet rates (bench/roofline.py)")
        if CPU_MEMORY:
            out.append("FEATCAL_BENCH_MEMORY=1: allocators set up to measure memory; times not comparable")
        out += [f"torch.matmul peak {str(d)[6:]}: {r / 1e12:.2f} TFLOP/s" for d, r in self.peaks.items()]
        head = (
            "median ms",
            "TFLOP/s",
            "% of peak",
            "vs reference",
            "peak extra MB",
            "% of roofline",
            "rel error",
        )
        out.append(f"| {'case':<34} | {'impl':<12} | " + " | ".join(f"{h:>13}" for h in head) + " |")
        out.append("|" + "|".join("-" * w for w in (36, 14, *[15] * len(head))) + "|")
        base = {r.case: r.seconds for r in self.rows if r.impl == "reference"}
        for r in self.rows:
            rate = r.flops / r.seconds
            cells = (
                f"{r.seconds * 1e3:.2f}",
                f"{rate / 1e12:.3f}",
                f"{100 * rate / self.peaks[r.dtype]:.1f}%",
                f"{base[r.case] / r.seconds:.2f}x" if r.case in base else "-",
                "-" if r.extra_bytes is None else f"{r.extra_bytes / 2**20:.0f}",
                "-" if r.floor is None else f"{100 * r.floor / r.seconds:.1f}%",
                "-" if r.error is None else f"{r.error:.1e}",
            )
            out.append(f"| {r.case:<34} | {r.impl:<12} | " + " | ".join(f"{c:>13}" for c in cells) + " |")
        return out


_summary = Summary()


@pytest.fixture(scope="session")
def summary() -> Summary:
    return _summary


@pytest.fixture(scope="session")
def peak_memory() -> Callable[[Callable[[], object]], int | None]:
    """peak_extra_bytes, for the benchmarks (conftest modules are not importable by name)."""
    return peak_extra_bytes


def pytest_terminal_summary(terminalreporter):
    if _summary.rows:
        terminalreporter.section("featcal benchmarks")
        for line in _summary.lines():
            terminalreporter.write_line(line)
