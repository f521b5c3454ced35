"""Moments of normalised tokens: out_sum += sum_n w_n z_n and out_sq += sum_n w_n z_n^2.

z = (x - mean(x)) / sqrt(var(x) + eps) per token (LayerNorm, biased variance) or
z = x / sqrt(mean(x^2) + eps) (RMSNorm), without affine. A first kernel finds each token's
mean and 1/std (two passes over its columns, into an (n, 2) scratch); a second sums w z and
w z^2 over row slices, one column block per program, and adds its sums atomically once. z is
never written out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import (
    INTERPRETED,
    SUPPORTED_DTYPES,
    KernelVariant,
    check_accumulator,
    check_inputs,
    check_weights,
    load_tile,
    load_weights,
    on_device,
    placeholder,
    row_slice,
    row_splits,
    weight_stride,
)


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
# Row slices of the moment pass: each program adds into its columns once, so at most
# SPLIT_N programs meet at one address.
SPLIT_N = 4 if INTERPRETED else 64


@triton.jit(do_not_specialize=["n"])
def _row_scale_kernel(
    x_ptr, scale_ptr, n, d, stride_n, stride_d, eps,
    RMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """scale[r] = (mean, 1 / std) of row r: two passes over its columns (mean 0 for RMSNorm)."""
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
    tl.store(scale_ptr + 2 * rows, mean, mask=in_rows)
    tl.store(scale_ptr + 2 * rows + 1, 1.0 / tl.sqrt(var / d + eps), mask=in_rows)


@triton.jit(do_not_specialize=["n"])
def _norm_moments_kernel(
    x_ptr, w_ptr, scale_ptr, sum_ptr, sq_ptr, n, d, stride_n, stride_d, stride_w, splits,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (j, s): columns j * BLOCK_D ... over the s-th row slice, summed in registers."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_cols = cols < d
    col_off = cols.to(tl.int64) * stride_d
    row_start, row_stop = row_slice(n, splits, tl.program_id(1), BLOCK_N)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(row_start, row_stop, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        in_rows = rows < row_stop
        x = load_tile(x_ptr, rows, in_rows, stride_n, col_off, in_cols).to(tl.float32)
        mean = tl.load(scale_ptr + 2 * rows, mask=in_rows, other=0.0)
        rstd = tl.load(scale_ptr + 2 * rows + 1, mask=in_rows, other=0.0)
        z = (x - mean[:, None]) * rstd[:, None]
        if HAS_W:
            wz = z * load_weights(w_ptr, rows, in_rows, stride_w)[:, None]
        else:
            wz = z
        wz = tl.where(in_rows[:, None] & in_cols[None, :], wz, 0.0)
        acc += tl.sum(wz, axis=0)
        acc_sq += tl.sum(wz * z, axis=0)
    tl.atomic_add(sum_ptr + cols, acc, mask=in_cols, sem="relaxed")
    tl.atomic_add(sq_ptr + cols, acc_sq, mask=in_cols, sem="relaxed")


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
    w = check_weights("norm_moments", w, n, x.device)
    if n == 0:
        return out_sum, out_sq
    scale = torch.empty(n, 2, dtype=torch.float32, device=x.device)
    split = row_splits(n, SPLIT_N, BLOCK_N)
    with on_device(x):
        _row_scale_kernel[(triton.cdiv(n, BLOCK_N),)](
            x, scale, n, d, x.stride(0), x.stride(1), float(eps), RMS=rms, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D
        )
        _norm_moments_kernel[(triton.cdiv(d, BLOCK_D), split)](
            x, placeholder(x.device) if w is None else w, scale, out_sum, out_sq,
            n, d, x.stride(0), x.stride(1), weight_stride(w), split,
            HAS_W=w is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return out_sum, out_sq


def compile_variants() -> list[KernelVariant]:
    """What `norm_moments` can launch: both kernels for every input dtype, LayerNorm and RMSNorm,
    with and without weights."""
    float32 = torch.float32
    variants = []
    for dtype in SUPPORTED_DTYPES:
        name = str(dtype).removeprefix("torch.")
        for rms in (False, True):
            variants.append(KernelVariant(
                fn=_row_scale_kernel, dtype=name, flags="rms" if rms else "layernorm",
                pointers={"x_ptr": dtype, "scale_ptr": float32},
                constexprs={"RMS": rms, "BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D},
                scalars={"eps": "fp32"}, divisible=("d", "stride_n"), unit=("stride_d",),
            ))  # fmt: skip
        for has_w in (False, True):
            variants.append(KernelVariant(
                fn=_norm_moments_kernel, dtype=name, flags="w" if has_w else "-",
                pointers={"x_ptr": dtype, "w_ptr": float32, "scale_ptr": float32}
                | {"sum_ptr": float32, "sq_ptr": float32},
                constexprs={"HAS_W": has_w, "BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D},
                divisible=("d", "stride_n"), unit=("stride_d", "stride_w"),
            ))  # fmt: skip
    return variants
