"""Weighted products of activations: out += x^T diag(w) y, and the Gram out += x^T diag(w) x.

One kernel serves both. Program (i, j, s) owns output tile (i, j) and the s-th of SPLIT_K
slices of the rows. It streams its slice of x and y once, with int64 row offsets so strided
(n, d) views of (batch, tokens, d) states need no copy, multiplies on the matrix units with a
float32 accumulator and adds the tile into `out` (atomically when SPLIT_K > 1). The weighted
column sums, when asked for, are one pass of `column_sum.weighted_sum` after it. The tile
config is picked per problem by `autotune.Tuner`.

For the Gram with `lower_only`, tiles wholly above the diagonal are skipped, so every entry
(r, c) with r >= c is accumulated; `mirror_lower` copies the strict lower triangle up once,
when accumulation ends.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .autotune import LAUNCH_FAILURES, TileConfig, Tuner, device_shared_memory, fitting
from .column_sum import weighted_sum
from .launch import (
    FLOAT32_PRECISIONS,
    INTERPRETED,
    SUPPORTED_DTYPES,
    KernelVariant,
    check_accumulator,
    check_inputs,
    check_weights,
    dot_options,
    load_tile,
    load_weights,
    on_device,
    placeholder,
    row_slice,
    weight_stride,
)


def reference(x: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
    """float64 x^T diag(w) y, the value the kernel must match."""
    x64, y64 = x.double(), y.double()
    return (x64 if w is None else x64 * w.double()[:, None]).mT @ y64


def _tiles(*shapes: tuple[int, int, int, int, int, int]) -> list[TileConfig]:
    return [TileConfig(*shape[:4], num_warps=shape[4], num_stages=shape[5]) for shape in shapes]


# Tile configs per kind of dot, chosen so that no variant spills registers on sm_80 or sm_90
# (bench/results/compile-check.md): 16-bit operands on the matrix units; float32 (or upcast)
# operands with TF32, with tf32x3 (three products: more live registers, smaller tiles), and with
# IEEE precision, FMAs on the CUDA cores (each thread holds its share of the tile: smaller still).
#   BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages
CONFIGS = {
    "16-bit": _tiles(
        (128, 128, 64, 1, 8, 3), (128, 128, 64, 1, 8, 4), (64, 256, 64, 1, 8, 3), (128, 64, 64, 2, 8, 4),
        (128, 64, 64, 4, 8, 4), (64, 128, 64, 2, 4, 4), (64, 64, 64, 4, 4, 4), (64, 64, 32, 8, 4, 3),
    ),
    "tf32": _tiles(
        (128, 128, 64, 1, 8, 3), (128, 128, 32, 1, 8, 3), (128, 128, 32, 2, 8, 4), (128, 64, 64, 2, 8, 3),
        (128, 64, 32, 2, 4, 4), (64, 128, 32, 2, 4, 4), (64, 64, 64, 4, 4, 4), (64, 64, 32, 8, 4, 3),
    ),
    "tf32x3": _tiles(
        (128, 64, 32, 1, 8, 3), (128, 64, 32, 2, 8, 3), (64, 128, 32, 1, 8, 3), (64, 128, 32, 2, 8, 3),
        (64, 64, 32, 2, 4, 3), (64, 64, 32, 8, 4, 3),
    ),
    "ieee": _tiles(
        (64, 64, 32, 1, 8, 3), (64, 64, 16, 4, 8, 3), (128, 64, 16, 2, 8, 3), (64, 64, 16, 2, 8, 3),
        (64, 64, 16, 8, 4, 3), (64, 32, 32, 4, 4, 3), (32, 32, 32, 8, 4, 3),
    ),
}  # fmt: skip


def dot_kind(x_dtype: torch.dtype, y_dtype: torch.dtype, precision: str) -> str:
    """The CONFIGS key of a compiled dot: "16-bit" when both operands are one 16-bit dtype, else
    the float32 precision (mixed dtypes are upcast)."""
    return "16-bit" if x_dtype == y_dtype != torch.float32 else precision


# Tiles in the interpreter, where each program costs Python time and no config is timed.
INTERPRETER_CONFIG = TileConfig(block_m=64, block_n=64, block_k=64, split_k=2, num_warps=4, num_stages=1)
# Whether launches pick a config with the tuner (compiled kernels) or take INTERPRETER_CONFIG.
TUNING = not INTERPRETED
tuner = Tuner(failures=LAUNCH_FAILURES)


@triton.jit(do_not_specialize=["n"])
def _weighted_product_kernel(
    x_ptr, y_ptr, w_ptr, out_ptr,
    n, dx, dy,
    stride_xn, stride_xd, stride_yn, stride_yd, stride_w, stride_om, stride_on,
    HAS_W: tl.constexpr, LOWER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if LOWER:
        if pid_n * BLOCK_N > pid_m * BLOCK_M + BLOCK_M - 1:
            return
    row_start, row_stop = row_slice(n, SPLIT_K, pid_s, BLOCK_K)
    cols_x = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_y = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_x = cols_x < dx
    in_y = cols_y < dy
    col_off_x = cols_x.to(tl.int64) * stride_xd
    col_off_y = cols_y.to(tl.int64) * stride_yd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(row_start, row_stop, BLOCK_K):
        rows = start + tl.arange(0, BLOCK_K)
        in_rows = rows < row_stop
        a = load_tile(x_ptr, rows, in_rows, stride_xn, col_off_x, in_x)
        b = load_tile(y_ptr, rows, in_rows, stride_yn, col_off_y, in_y)
        # The weights scale y's tile, whose rows they index in its loaded layout, so x's tile
        # reaches the dot unchanged (transposed only).
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if HAS_W:
            b = (b.to(tl.float32) * load_weights(w_ptr, rows, in_rows, stride_w)[:, None]).to(b.dtype)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + cols_x.to(tl.int64)[:, None] * stride_om + cols_y.to(tl.int64)[None, :] * stride_on
    in_out = in_x[:, None] & in_y[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, tl.load(out_ptrs, mask=in_out) + acc, mask=in_out)
    else:
        tl.atomic_add(out_ptrs, acc, mask=in_out, sem="relaxed")


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


def _launch(x: Tensor, y: Tensor, w: Tensor | None, out: Tensor, *, lower: bool, precision: str) -> Tensor:
    n, dx = x.shape
    dy = y.shape[1]
    if n == 0:
        return out
    flags = {"HAS_W": w is not None, "LOWER": lower, **dot_options(x.dtype, y.dtype, precision=precision)}

    def launch(config: TileConfig, into: Tensor) -> None:
        grid = (triton.cdiv(dx, config.block_m), triton.cdiv(dy, config.block_n), config.split_k)
        _weighted_product_kernel[grid](
            x, y, placeholder(x.device) if w is None else w, into,
            n, dx, dy,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), weight_stride(w),
            into.stride(0), into.stride(1),
            **flags, **config.meta(), num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip

    with on_device(x):
        if TUNING:
            key = (x.device, x.dtype, y.dtype, dx, dy, *flags.values())
            kind = dot_kind(x.dtype, y.dtype, precision)

            def candidates() -> list[TileConfig]:
                limit = device_shared_memory(x.device)
                sizes = (x.element_size(), y.element_size())
                return fitting(CONFIGS[kind], limit, *sizes, float32_dot=kind != "16-bit")

            scratch: list[Tensor] = []  # allocated on the first trial only, and only if one runs

            def trial(config: TileConfig) -> None:
                if not scratch:
                    scratch.append(torch.zeros_like(out))  # zeros: no NaN garbage in the timed adds
                launch(config, scratch[0])

            config = tuner.choose(key, candidates, trial)
        else:
            config = INTERPRETER_CONFIG
        launch(config, out)
    return out


def weighted_gram(
    x: Tensor,
    w: Tensor | None,
    out: Tensor,
    *,
    lower_only: bool = False,
    out_sum: Tensor | None = None,
    precision: str = "ieee",
) -> Tensor:
    """out += x^T diag(w) x (x: (n, d); out: float32 (d, d)); out_sum += sum_n w_n x_n if given.

    With `lower_only`, entries above the diagonal may be left partly accumulated; call
    `mirror_lower(out)` once at the end. `precision` ("ieee", "tf32", "tf32x3") is how float32
    products run on a GPU (featcal.config.FLOAT32_PRECISIONS).
    """
    check_inputs("weighted_gram", x)
    n, d = x.shape
    check_accumulator("weighted_gram", out, (d, d), x.device)
    if out_sum is not None:
        check_accumulator("weighted_gram sum", out_sum, (d,), x.device)
    w = check_weights("weighted_gram", w, n, x.device)
    _launch(x, x, w, out, lower=lower_only, precision=precision)
    if out_sum is not None:
        weighted_sum(x, w, out_sum)
    return out


def weighted_cross(
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    out: Tensor,
    *,
    out_sum_y: Tensor | None = None,
    precision: str = "ieee",
) -> Tensor:
    """out += x^T diag(w) y (x: (n, dx), y: (n, dy); out: float32 (dx, dy));
    out_sum_y += sum_n w_n y_n if given; `precision` as in `weighted_gram`."""
    check_inputs("weighted_cross", x, y)
    n, dx = x.shape
    if y.shape[0] != n:
        raise ValueError(f"weighted_cross: x has {n} rows but y has {y.shape[0]}")
    check_accumulator("weighted_cross", out, (dx, y.shape[1]), x.device)
    if out_sum_y is not None:
        check_accumulator("weighted_cross sum", out_sum_y, (y.shape[1],), x.device)
    w = check_weights("weighted_cross", w, n, x.device)
    _launch(x, y, w, out, lower=False, precision=precision)
    if out_sum_y is not None:
        weighted_sum(y, w, out_sum_y)
    return out


MIRROR_BLOCK = 64


def _pairs() -> list[tuple[torch.dtype, torch.dtype]]:
    """The (x, y) dtypes the kernel is launched with: every pair, mixed ones in both orders."""
    return list(itertools.product(SUPPORTED_DTYPES, repeat=2))


def _flag_combinations() -> list[tuple[torch.dtype, torch.dtype, str, bool, bool]]:
    """(x dtype, y dtype, precision, lower, weighted) for every launch a GPU can receive."""
    combos = []
    for x_dtype, y_dtype in _pairs():
        float32_dot = dot_kind(x_dtype, y_dtype, "ieee") != "16-bit"
        for precision in FLOAT32_PRECISIONS if float32_dot else ("ieee",):
            for lower in (False, True) if x_dtype == y_dtype else (False,):
                combos += [(x_dtype, y_dtype, precision, lower, has_w) for has_w in (False, True)]
    return combos


def compile_variants() -> list[KernelVariant]:
    """What `weighted_gram`, `weighted_cross` and `mirror_lower` can launch on a GPU: every dtype
    pair, float32 precision, weighting, lower-triangle flag and tile config."""
    float32 = torch.float32
    variants = []
    for x_dtype, y_dtype, precision, lower, has_w in _flag_combinations():
        name = " x ".join(dict.fromkeys(str(t).removeprefix("torch.") for t in (x_dtype, y_dtype)))
        flags = " ".join(f for f in (precision, "lower" if lower else "", "w" if has_w else "") if f)
        kind = dot_kind(x_dtype, y_dtype, precision)
        sizes = {"x_bytes": x_dtype.itemsize, "y_bytes": y_dtype.itemsize, "float32_dot": kind != "16-bit"}
        for config in CONFIGS[kind]:
            variants.append(KernelVariant(
                fn=_weighted_product_kernel, dtype=name, flags=flags,
                pointers={"x_ptr": x_dtype, "y_ptr": y_dtype, "w_ptr": float32, "out_ptr": float32},
                constexprs={
                    "HAS_W": has_w, "LOWER": lower,
                    **dot_options(x_dtype, y_dtype, precision=precision), **config.meta(),
                },
                num_warps=config.num_warps, num_stages=config.num_stages,
                divisible=("dx", "dy", "stride_xn", "stride_yn", "stride_om"),
                unit=("stride_xd", "stride_yd", "stride_w", "stride_on"),
                shared_bound=config.shared_memory(**sizes),
            ))  # fmt: skip
    variants.append(KernelVariant(
        fn=_mirror_lower_kernel, dtype="float32", flags="-", pointers={"g_ptr": float32},
        constexprs={"BLOCK": MIRROR_BLOCK}, divisible=("d", "stride_r"), unit=("stride_c",),
    ))  # fmt: skip
    return variants


def mirror_lower(g: Tensor) -> Tensor:
    """Copy the strict lower triangle of the square g onto its upper triangle, in place; returns g."""
    check_inputs("mirror_lower", g)
    d = g.shape[0]
    check_accumulator("mirror_lower", g, (d, d), g.device)
    tiles = triton.cdiv(d, MIRROR_BLOCK)
    with on_device(g):
        _mirror_lower_kernel[(tiles, tiles)](g, d, g.stride(0), g.stride(1), BLOCK=MIRROR_BLOCK)
    return g
