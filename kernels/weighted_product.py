"""Weighted products of activations: out += x^T diag(w) y, and the Gram out += x^T diag(w) x.

One kernel serves both. Program (i, j, s) owns output tile (i, j) and the s-th of SPLIT_K
slices of the rows. It streams its slice of x and y once, with int64 row offsets so strided
(n, d) views of (batch, tokens, d) states need no copy, multiplies on the matrix units with a
float32 accumulator and adds the tile into `out` (atomically when SPLIT_K > 1). The weighted
column sums ride along: programs of tile column 0 add sum_n w_n x_n to `sum_x`, programs of
tile row 0 add sum_n w_n y_n to `sum_y`.

For the Gram with `lower_only`, tiles wholly above the diagonal are skipped, so every entry
(r, c) with r >= c is accumulated; `mirror_lower` copies the strict lower triangle up once,
when accumulation ends.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .launch import (
    INTERPRETED,
    check_accumulator,
    check_inputs,
    check_weights,
    dot_options,
    load_tile,
    on_device,
    placeholder,
)


def reference(x: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
    """float64 x^T diag(w) y, the value the kernel must match."""
    x64, y64 = x.double(), y.double()
    return (x64 if w is None else x64 * w.double()[:, None]).mT @ y64


def _configs() -> list[triton.Config]:
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages
        (128, 128, 64, 1, 8, 3),
        (128, 128, 64, 4, 8, 3),
        (128, 256, 64, 1, 8, 3),
        (128, 128, 32, 2, 4, 4),
        (128, 64, 64, 2, 4, 4),
        (64, 128, 64, 2, 4, 4),
        (64, 64, 64, 8, 4, 4),
        (64, 64, 32, 4, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st)
        for m, n, k, s, w, st in shapes
    ]


# Tile sizes in the interpreter, where each program costs Python time and no config is timed.
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}


@triton.jit
def _weighted_product_kernel(
    x_ptr, y_ptr, w_ptr, out_ptr, sum_x_ptr, sum_y_ptr,
    n, dx, dy,
    stride_xn, stride_xd, stride_yn, stride_yd, stride_om, stride_on,
    HAS_W: tl.constexpr, LOWER: tl.constexpr, SUM_X: tl.constexpr, SUM_Y: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if LOWER:
        if pid_n * BLOCK_N > pid_m * BLOCK_M + BLOCK_M - 1:
            return
    rows_per_split = tl.cdiv(tl.cdiv(n, SPLIT_K), BLOCK_K) * BLOCK_K
    row_start = pid_s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n)
    cols_x = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_y = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_x = cols_x < dx
    in_y = cols_y < dy
    col_off_x = cols_x.to(tl.int64) * stride_xd
    col_off_y = cols_y.to(tl.int64) * stride_yd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(row_start, row_stop, BLOCK_K):
        rows = start + tl.arange(0, BLOCK_K)
        in_rows = rows < row_stop
        a = load_tile(x_ptr, rows, in_rows, stride_xn, col_off_x, in_x)
        b = load_tile(y_ptr, rows, in_rows, stride_yn, col_off_y, in_y)
        if HAS_W:
            wk = tl.load(w_ptr + rows, mask=in_rows, other=0.0).to(tl.float32)
            aw = a.to(tl.float32) * wk[:, None]
            if SUM_Y:
                sy += tl.sum(b.to(tl.float32) * wk[:, None], axis=0)
        else:
            aw = a.to(tl.float32)
            if SUM_Y:
                sy += tl.sum(b.to(tl.float32), axis=0)
        if SUM_X:
            sx += tl.sum(aw, axis=0)
        if UPCAST:
            acc = tl.dot(tl.trans(aw), b.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(aw.to(a.dtype)), b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + cols_x.to(tl.int64)[:, None] * stride_om + cols_y.to(tl.int64)[None, :] * stride_on
    in_out = in_x[:, None] & in_y[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, tl.load(out_ptrs, mask=in_out) + acc, mask=in_out)
    else:
        tl.atomic_add(out_ptrs, acc, mask=in_out)
    if SUM_X:
        if pid_n == 0:
            tl.atomic_add(sum_x_ptr + cols_x, sx, mask=in_x)
    if SUM_Y:
        if pid_m == 0:
            tl.atomic_add(sum_y_ptr + cols_y, sy, mask=in_y)


_tuned_kernel = triton.autotune(
    configs=_configs(),
    key=["dx", "dy", "LOWER", "PRECISION"],
    restore_value=["out_ptr", "sum_x_ptr", "sum_y_ptr"],
)(_weighted_product_kernel)


@triton.jit
def _mirror_lower_kernel(g_ptr, d, stride_r, stride_c, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n > pid_m:
        return
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    strict = (rows[:, None] > cols[None, :]) & (rows[:, None] < d)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    tile = tl.load(g_ptr + rows64[:, None] * stride_r + cols64[None, :] * stride_c, mask=strict)
    tl.store(g_ptr + cols64[None, :] * stride_r + rows64[:, None] * stride_c, tile, mask=strict)


def _launch(
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    out: Tensor,
    sum_x: Tensor | None,
    sum_y: Tensor | None,
    *,
    lower: bool,
    tf32: bool,
) -> Tensor:
    n, dx = x.shape
    dy = y.shape[1]
    spare = placeholder(x.device)
    args = (
        x, y, spare if w is None else w, out,
        spare if sum_x is None else sum_x, spare if sum_y is None else sum_y,
        n, dx, dy,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    flags = {
        "HAS_W": w is not None,
        "LOWER": lower,
        "SUM_X": sum_x is not None,
        "SUM_Y": sum_y is not None,
        **dot_options(x.dtype, y.dtype, tf32=tf32),
    }
    if n == 0:
        return out
    with on_device(x):
        if INTERPRETED:
            c = INTERPRETER_CONFIG
            grid = (triton.cdiv(dx, c["BLOCK_M"]), triton.cdiv(dy, c["BLOCK_N"]), c["SPLIT_K"])
            _weighted_product_kernel[grid](*args, **flags, **c)
        else:
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(dx, meta["BLOCK_M"]),
                triton.cdiv(dy, meta["BLOCK_N"]),
                meta["SPLIT_K"],
            )
            _tuned_kernel[grid](*args, **flags)
    return out


def weighted_gram(
    x: Tensor,
    w: Tensor | None,
    out: Tensor,
    *,
    lower_only: bool = False,
    out_sum: Tensor | None = None,
    tf32: bool = False,
) -> Tensor:
    """out += x^T diag(w) x (x: (n, d); out: float32 (d, d)); out_sum += sum_n w_n x_n if given.

    With `lower_only`, entries above the diagonal may be left partly accumulated; call
    `mirror_lower(out)` once at the end.
    """
    check_inputs("weighted_gram", x)
    n, d = x.shape
    check_accumulator("weighted_gram", out, (d, d), x.device)
    if out_sum is not None:
        check_accumulator("weighted_gram sum", out_sum, (d,), x.device)
    check_weights("weighted_gram", w, n, x.device)
    _launch(x, x, w, out, out_sum, None, lower=lower_only, tf32=tf32)
    return out


def weighted_cross(
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    out: Tensor,
    *,
    out_sum_y: Tensor | None = None,
    tf32: bool = False,
) -> Tensor:
    """out += x^T diag(w) y (x: (n, dx), y: (n, dy); out: float32 (dx, dy));
    out_sum_y += sum_n w_n y_n if given."""
    check_inputs("weighted_cross", x, y)
    n, dx = x.shape
    if y.shape[0] != n:
        raise ValueError(f"weighted_cross: x has {n} rows but y has {y.shape[0]}")
    check_accumulator("weighted_cross", out, (dx, y.shape[1]), x.device)
    if out_sum_y is not None:
        check_accumulator("weighted_cross sum", out_sum_y, (y.shape[1],), x.device)
    check_weights("weighted_cross", w, n, x.device)
    _launch(x, y, w, out, None, out_sum_y, lower=False, tf32=tf32)
    return out


MIRROR_BLOCK = 64


def mirror_lower(g: Tensor) -> Tensor:
    """Copy the strict lower triangle of the square g onto its upper triangle, in place; returns g."""
    check_inputs("mirror_lower", g)
    d = g.shape[0]
    if g.dim() != 2 or g.shape[1] != d:
        raise ValueError(f"mirror_lower: g must be square, got {tuple(g.shape)}")
    tiles = triton.cdiv(d, MIRROR_BLOCK)
    with on_device(g):
        _mirror_lower_kernel[(tiles, tiles)](g, d, g.stride(0), g.stride(1), BLOCK=MIRROR_BLOCK)
    return g
