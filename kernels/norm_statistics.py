"""Moments of normalised tokens: out_sum += sum_n w_n z_n and out_sq += sum_n w_n z_n^2.

z = (x - mean(x)) / sqrt(var(x) + eps) per token (LayerNorm, biased variance) or
z = x / sqrt(mean(x^2) + eps) (RMSNorm), without affine. Program s owns BLOCK_N tokens: it
finds their mean and variance in two passes over their columns, then normalises them column
block by column block and adds the weighted column sums atomically. z is never written out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import check_accumulator, check_inputs, check_weights, load_tile, on_device, placeholder


def reference(
    x: Tensor, w: Tensor | None = None, *, rms: bool = False, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """float64 (sum_n w_n z_n, sum_n w_n z_n^2)."""
    x64 = x.double()
    if rms:
        z = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    else:
        centred = x64 - x64.mean(-1, keepdim=True)
        z = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    ww = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if w is None else w.double()
    return ww @ z, ww @ z.square()


BLOCK_N = 16
BLOCK_D = 128


@triton.jit
def _norm_moments_kernel(
    x_ptr, w_ptr, sum_ptr, sq_ptr, n, d, stride_n, stride_d, eps,
    HAS_W: tl.constexpr, RMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n
    mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if not RMS:
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            x = load_tile(x_ptr, rows, in_rows, stride_n, cols.to(tl.int64) * stride_d, cols < d)
            mean += tl.sum(x.to(tl.float32), axis=1)
        mean = mean / d
    var = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = load_tile(x_ptr, rows, in_rows, stride_n, cols.to(tl.int64) * stride_d, cols < d)
        mask = in_rows[:, None] & (cols < d)[None, :]
        centred = tl.where(mask, x.to(tl.float32) - mean[:, None], 0.0)
        var += tl.sum(centred * centred, axis=1)
    rstd = 1.0 / tl.sqrt(var / d + eps)
    if HAS_W:
        wn = tl.load(w_ptr + rows, mask=in_rows, other=0.0).to(tl.float32)
    else:
        wn = tl.where(in_rows, 1.0, 0.0)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        in_cols = cols < d
        mask = in_rows[:, None] & in_cols[None, :]
        x = load_tile(x_ptr, rows, in_rows, stride_n, cols.to(tl.int64) * stride_d, in_cols)
        z = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
        wz = tl.where(mask, z * wn[:, None], 0.0)
        tl.atomic_add(sum_ptr + cols, tl.sum(wz, axis=0), mask=in_cols)
        tl.atomic_add(sq_ptr + cols, tl.sum(wz * z, axis=0), mask=in_cols)


def norm_moments(
    x: Tensor,
    w: Tensor | None,
    out_sum: Tensor,
    out_sq: Tensor,
    *,
    rms: bool = False,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Add the weighted first and second moments of the normalised rows of x (n, d) to the
    float32 (d,) accumulators; returns (out_sum, out_sq)."""
    check_inputs("norm_moments", x)
    n, d = x.shape
    check_accumulator("norm_moments", out_sum, (d,), x.device)
    check_accumulator("norm_moments", out_sq, (d,), x.device)
    check_weights("norm_moments", w, n, x.device)
    if n == 0:
        return out_sum, out_sq
    with on_device(x):
        _norm_moments_kernel[(triton.cdiv(n, BLOCK_N),)](
            x, placeholder(x.device) if w is None else w, out_sum, out_sq,
            n, d, x.stride(0), x.stride(1), float(eps),
            HAS_W=w is not None, RMS=rms, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return out_sum, out_sq
