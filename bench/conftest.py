"""The benchmarks' summary table: per row the median time, the useful TFLOP/s and the share of
a plain torch.matmul's rate in the same dtype on the same device, measured in the same run."""

from __future__ import annotations

import time

import pytest
import torch


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


class Summary:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, float, torch.dtype]] = []
        self.peaks: dict[torch.dtype, float] = {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def add(self, case: str, impl: str, seconds: float, flops: float, dtype: torch.dtype) -> None:
        if dtype not in self.peaks:
            self.peaks[dtype] = matmul_rate(dtype, self.device)
        self.rows.append((case, impl, seconds, flops, dtype))

    def lines(self) -> list[str]:
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        out = [f"device: {name}; torch {torch.__version__}"]
        out += [f"torch.matmul peak {str(d)[6:]}: {r / 1e12:.2f} TFLOP/s" for d, r in self.peaks.items()]
        head = ("case", "impl", "median ms", "TFLOP/s", "% of peak", "vs reference")
        out.append(f"| {head[0]:<34} | {head[1]:<12} | " + " | ".join(f"{h:>12}" for h in head[2:]) + " |")
        out.append("|" + "|".join("-" * w for w in (36, 14, 14, 14, 14, 14)) + "|")
        base = {case: s for case, impl, s, _, _ in self.rows if impl == "reference"}
        for case, impl, seconds, flops, dtype in self.rows:
            rate = flops / seconds
            ratio = f"{base[case] / seconds:.2f}x" if case in base else "-"
            out.append(
                f"| {case:<34} | {impl:<12} | {seconds * 1e3:>12.2f} | {rate / 1e12:>12.3f} "
                f"| {100 * rate / self.peaks[dtype]:>11.1f}% | {ratio:>12} |"
            )
        return out


_summary = Summary()


@pytest.fixture(scope="session")
def summary() -> Summary:
    return _summary


def pytest_terminal_summary(terminalreporter):
    if _summary.rows:
        terminalreporter.section("featcal statistics benchmark")
        for line in _summary.lines():
            terminalreporter.write_line(line)
