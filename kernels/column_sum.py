"""Weighted column sums: out += sum_n w_n x_n for x of shape (n, d).

Program (j, s) owns columns j * BLOCK_D ... and the s-th of up to SPLIT_N slices of the rows, sums in
float32 and adds atomically into `out`.
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


def reference(x: Tensor, w: Tensor | None = None) -> Tensor:
    """float64 sum_n w_n x_n."""
    x64 = x.double()
    return (x64 if w is None else x64 * w.double()[:, None]).sum(0)


BLOCK_D = 128
BLOCK_N = 32
# Row slices summed by separate programs (more of them keep a GPU busy when d is small).
SPLIT_N = 4 if INTERPRETED else 64


@triton.jit(do_not_specialize=["n"])
def _weighted_sum_kernel(
    x_ptr, w_ptr, out_ptr, n, d, stride_n, stride_d, stride_w,
    splits, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_cols = cols < d
    col_off = cols.to(tl.int64) * stride_d
    row_start, row_stop = row_slice(n, splits, tl.program_id(1), BLOCK_N)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(row_start, row_stop, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        in_rows = rows < row_stop
        x = load_tile(x_ptr, rows, in_rows, stride_n, col_off, in_cols).to(tl.float32)
        if HAS_W:
            x = x * load_weights(w_ptr, rows, in_rows, stride_w)[:, None]
        acc += tl.sum(x, axis=0)
    tl.atomic_add(out_ptr + cols, acc, mask=in_cols, sem="relaxed")


def weighted_sum(x: Tensor, w: Tensor | None, out: Tensor) -> Tensor:
    """out += sum_n w_n x_n (x: (n, d); out: float32 (d,)); returns out."""
    check_inputs("weighted_sum", x)
    n, d = x.shape
    check_accumulator("weighted_sum", out, (d,), x.device)
    w = check_weights("weighted_sum", w, n, x.device)
    if n == 0:
        return out
    split = row_splits(n, SPLIT_N, BLOCK_N)
    grid = (triton.cdiv(d, BLOCK_D), split)
    with on_device(x):
        _weighted_sum_kernel[grid](
            x, placeholder(x.device) if w is None else w, out,
            n, d, x.stride(0), x.stride(1), weight_stride(w), split,
            HAS_W=w is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return out


def compile_variants() -> list[KernelVariant]:
    """What `weighted_sum` can launch: every input dtype, with and without weights."""
    return [
        KernelVariant(
            fn=_weighted_sum_kernel,
            dtype=str(dtype).removeprefix("torch."),
            flags="w" if has_w else "-",
            pointers={"x_ptr": dtype, "w_ptr": torch.float32, "out_ptr": torch.float32},
            constexprs={"HAS_W": has_w, "BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D},
            divisible=("d", "stride_n"),
            unit=("stride_d", "stride_w"),
        )
        for dtype in SUPPORTED_DTYPES
        for has_w in (False, True)
    ]
