"""What every kernel file needs: the mode the kernels were built in, argument checks, dot options,
and the strided tile load."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from featcal.config import FLOAT32_PRECISIONS

# True when the kernels were decorated under TRITON_INTERPRET=1: they then run on CPU tensors
# through Triton's interpreter, and not compiled on a GPU.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(name: str, *tensors: Tensor) -> None:
    """Inputs are float32/float16/bfloat16 on one device the kernels can run on."""
    device = tensors[0].device
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: Triton kernels take float32, float16 or bfloat16, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: tensors on {device} and {t.device}")
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"{name}: tensors on {device} need Triton's interpreter; set TRITON_INTERPRET=1 "
            "before featcal.kernels is imported"
        )


def check_accumulator(name: str, out: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if out.dtype != torch.float32 or tuple(out.shape) != shape or out.device != device:
        raise ValueError(
            f"{name}: accumulator must be float32 {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def check_weights(name: str, w: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """w as the kernels read it: None, or n float32 weights on `device` of any stride (w[i] at
    w_ptr + i * w.stride(0)); weights of another dtype are converted."""
    if w is not None and (w.dim() != 1 or w.shape[0] != n or w.device != device):
        raise ValueError(f"{name}: w must have shape ({n},) on {device}, got {tuple(w.shape)} on {w.device}")
    return w if w is None or w.dtype == torch.float32 else w.to(torch.float32)


def weight_stride(w: Tensor | None) -> int:
    return 0 if w is None else w.stride(0)


def dot_options(*dtypes: torch.dtype, precision: str = "ieee") -> dict:
    """UPCAST and PRECISION for kernels that call tl.dot on operands of these dtypes.

    Operands are upcast to float32 before the dot when their dtypes differ, and for bfloat16
    in the interpreter, whose bf16 dot returns garbage (Triton 3.9). `precision` applies to
    float32 dots (those with an upcast or float32 operands); 16-bit dots, and every dot in the
    interpreter, are exact products with float32 sums and get "ieee".
    """
    if precision not in FLOAT32_PRECISIONS:
        raise ValueError(
            f"float32 precision must be one of {', '.join(FLOAT32_PRECISIONS)}, got {precision!r}"
        )
    upcast = len(set(dtypes)) > 1 or (INTERPRETED and torch.bfloat16 in dtypes)
    float32_dot = upcast or torch.float32 in dtypes
    return {"UPCAST": upcast, "PRECISION": precision if float32_dot and not INTERPRETED else "ieee"}


def on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


_placeholders: dict[torch.device, Tensor] = {}


def placeholder(device: torch.device) -> Tensor:
    """A one-element float32 tensor passed for pointer arguments a kernel variant never touches."""
    if device not in _placeholders:
        _placeholders[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _placeholders[device]


@triton.jit
def load_tile(ptr, rows, in_rows, stride_rows, col_offsets, in_cols):
    """The (rows x columns) tile of a strided matrix at int64 element offsets, 0 where masked."""
    return tl.load(
        ptr + rows.to(tl.int64)[:, None] * stride_rows + col_offsets[None, :],
        mask=in_rows[:, None] & in_cols[None, :],
        other=0.0,
    )


@triton.jit
def load_weights(w_ptr, rows, in_rows, stride_w):
    """Token weights w[rows] as float32 from a strided vector, 0 where masked."""
    return tl.load(w_ptr + rows.to(tl.int64) * stride_w, mask=in_rows, other=0.0).to(tl.float32)


@dataclass(frozen=True)
class KernelVariant:
    """One compilation a launcher can ask for: a kernel, the dtypes of its pointers and the
    constexprs it passes (tile constexprs included), for `compile_check` to build ahead of time.

    Integer arguments are compiled as a contiguous, 16-byte aligned launch specialises them: the
    pointers, `divisible` arguments (row strides, widths) divisible by 16, and the `unit`
    arguments (column strides) equal to 1.
    """

    fn: Any
    dtype: str
    flags: str
    pointers: dict[str, torch.dtype]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    scalars: dict[str, str] = field(default_factory=dict)
    divisible: tuple[str, ...] = ()
    unit: tuple[str, ...] = ()
    shared_bound: int | None = None  # bytes the tuner assumes when it prunes; None: not tuned


def row_splits(n: int, most: int, block: int) -> int:
    """Row slices for n rows: at most `most`, each of at least one block."""
    return max(1, min(most, triton.cdiv(n, block)))


@triton.jit
def row_slice(n, splits, index, BLOCK: tl.constexpr):
    """[start, stop) of the index-th of `splits` slices of n rows, each a multiple of BLOCK rows."""
    rows_per_split = tl.cdiv(tl.cdiv(n, splits), BLOCK) * BLOCK
    start = index * rows_per_split
    return start, tl.minimum(start + rows_per_split, n)
