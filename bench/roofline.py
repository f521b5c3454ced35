"""The performance model beside the GPU benchmarks: for a shape, its flops and the fewest bytes it
must move (each input read once, each output written once), and the time the device's roofline
allows, max(flops / matrix rate, bytes / memory bandwidth). A measured row then reports the
share of that floor it reached.

Rates are the vendors' datasheet figures for the SXM parts, dense (no sparsity): leads, not
measurements. A float32 product runs at the CUDA cores' fp32 rate with IEEE precision, the TF32
rate with "tf32", and a third of it with "tf32x3" (three TF32 products each).

    python bench/roofline.py      prints the floors of the benchmark shapes on each device
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    name: str
    bf16: float  # flop/s, dense matrix units (fp16 the same)
    tf32: float  # flop/s, dense matrix units
    fp32: float  # flop/s, CUDA cores (FMA counted as 2)
    bandwidth: float  # bytes/s of HBM

    def rate(self, dtype: torch.dtype, precision: str = "ieee") -> float:
        """flop/s of a matrix product of `dtype` operands."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16
        return {"ieee": self.fp32, "tf32": self.tf32, "tf32x3": self.tf32 / 3}[precision]

    def floor(self, flops: float, nbytes: float, dtype: torch.dtype, precision: str = "ieee") -> float:
        """Seconds below which no implementation of this work can run on this device."""
        return max(flops / self.rate(dtype, precision), nbytes / self.bandwidth)


DEVICES = {
    "A100": Device("NVIDIA A100 SXM 80GB", bf16=312e12, tf32=156e12, fp32=19.5e12, bandwidth=2.039e12),
    "H100": Device("NVIDIA H100 SXM", bf16=989.4e12, tf32=494.7e12, fp32=66.9e12, bandwidth=3.35e12),
    "H200": Device("NVIDIA H200 SXM", bf16=989.4e12, tf32=494.7e12, fp32=66.9e12, bandwidth=4.8e12),
}


def device_named(name: str) -> Device | None:
    """The table's entry whose key appears in a device name such as 'NVIDIA H200'; None if none."""
    for key, device in DEVICES.items():
        if key in name:
            return device
    return None


def current_device() -> Device | None:
    return device_named(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def gram_work(n: int, d: int, dtype: torch.dtype) -> tuple[float, float]:
    """(flops, bytes) of G += x^T diag(w) x for x (n, d): the distinct entries' n d (d + 1)
    flops; x and w read once, G (float32) read and written once."""
    return n * d * (d + 1), n * d * dtype.itemsize + 4 * n + 8 * d * d


def cross_work(n: int, dx: int, dy: int, dtype: torch.dtype) -> tuple[float, float]:
    """(flops, bytes) of C += x^T diag(w) y for x (n, dx), y (n, dy)."""
    return 2 * n * dx * dy, n * (dx + dy) * dtype.itemsize + 4 * n + 8 * dx * dy


SHAPES = {  # what bench/test_statistics_kernels.py times
    "gram vit-b32 12800x768 bf16": gram_work(12800, 768, torch.bfloat16),
    "gram vit-b32 12800x3072 bf16": gram_work(12800, 3072, torch.bfloat16),
    "gram llama3-8b 4096x4096 bf16": gram_work(4096, 4096, torch.bfloat16),
    "gram llama3-8b 4096x14336 bf16": gram_work(4096, 14336, torch.bfloat16),
    "cross llama3-8b 4096x4096x4096 bf16": cross_work(4096, 4096, 4096, torch.bfloat16),
    "cross llama3-8b 4096x14336x4096 bf16": cross_work(4096, 14336, 4096, torch.bfloat16),
    "gram vit-b32 12800x768 fp32": gram_work(12800, 768, torch.float32),
}


def table() -> list[str]:
    lines = ["| shape | GFLOP | MB | " + " | ".join(f"{k} floor ms (bound)" for k in DEVICES) + " |"]
    lines.append("|" + "---|" * (3 + len(DEVICES)))
    for name, (flops, nbytes) in SHAPES.items():
        dtype = torch.float32 if name.endswith("fp32") else torch.bfloat16
        cells = []
        for device in DEVICES.values():
            seconds = device.floor(flops, nbytes, dtype)
            bound = "compute" if flops / device.rate(dtype) >= nbytes / device.bandwidth else "memory"
            cells.append(f"{seconds * 1e3:.3f} ({bound})")
        lines.append(f"| {name} | {flops / 1e9:.1f} | {nbytes / 1e6:.1f} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
