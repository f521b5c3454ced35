"""The one door to the statistics and solve kernels.

Everything above this module calls only these functions. Each has a pure PyTorch
implementation here, which is the reference later kernels must match and the fallback
when a native path cannot load.

`FEATCAL_BACKEND` picks the implementation: `auto` (default: Triton kernels for CUDA
tensors, PyTorch for CPU tensors), `torch` (the pure PyTorch reference everywhere) or `triton`
(the kernels for every device; CPU tensors then need `TRITON_INTERPRET=1`). The kernels
(`featcal.kernels`) are imported on first use; under `auto` a failed import falls back to
PyTorch with a one-line warning.

The solves (`ridge_solve`, `assemble`) run in the compiled extension featcal._C on every
device unless FEATCAL_BACKEND is `torch`; it is built on first use (featcal.extension), and
when it cannot be built PyTorch serves with a one-line warning.

Accumulators are float32, or float64 when the inputs are float64, whatever the input dtype.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from . import extension
from .errors import FeatCalError

log = logging.getLogger("featcal")

BACKENDS = ("auto", "torch", "triton")
STATISTICS_OPS = ("weighted_gram", "complete_gram", "weighted_cross", "weighted_sum", "norm_moments")
SOLVER_OPS = ("assemble", "ridge_solve")
OPS = (*STATISTICS_OPS, *SOLVER_OPS)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tile of the lower-triangle Gram: (1 + d / GRAM_TILE) / 2 tiles of d / GRAM_TILE per row,
# about 55% of the full product's flops for large d.
GRAM_TILE = 256
# Relative diagonal jitter tried, in order, when a Cholesky factorisation fails.
JITTER_STEPS = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


def requested_backend() -> str:
    """The backend named by FEATCAL_BACKEND (default `auto`)."""
    value = os.environ.get("FEATCAL_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise FeatCalError(f"FEATCAL_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


# Calls per (op, implementation) since import: what really served, for tests and reports.
served: Counter[tuple[str, str]] = Counter()

_kernels: ModuleType | None = None
_kernels_error: str | None = None


def _load_kernels() -> ModuleType | None:
    """featcal.kernels, imported once; None (and the reason in _kernels_error) if it cannot load."""
    global _kernels, _kernels_error
    if _kernels is None and _kernels_error is None:
        try:
            from . import kernels
        except ImportError as exc:
            _kernels_error = f"{type(exc).__name__}: {exc}"
            if requested_backend() == "auto":
                log.warning("Triton kernels unavailable (%s); PyTorch serves", _kernels_error)
        else:
            _kernels = kernels
    return _kernels


def _triton_serves(device: torch.device) -> str:
    """'triton', 'triton-interpreter' or 'torch' for statistics ops on float32/16/bf16 tensors of
    this device type, or the reason forced Triton cannot run."""
    backend = requested_backend()
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    kernels = _load_kernels()
    if kernels is None:
        return "torch" if backend == "auto" else f"unavailable ({_kernels_error})"
    if kernels.INTERPRETED:
        return "triton-interpreter"
    if device.type != "cuda":
        return "unavailable (CPU tensors need TRITON_INTERPRET=1 before featcal.kernels is imported)"
    return "triton"


def _kernels_for(op: str, out: Tensor, *inputs: Tensor) -> ModuleType | None:
    """The kernels module if Triton serves `op` for these tensors, else None; counts what served.

    float64 accumulators always go to PyTorch: the kernels accumulate in float32.
    """
    impl = "torch"
    if out.dtype == torch.float32 and all(t.dtype in TRITON_DTYPES for t in inputs):
        impl = _triton_serves(out.device)
        if impl.startswith("unavailable"):
            raise FeatCalError(f"{op}: FEATCAL_BACKEND=triton, but Triton is {impl}")
    served[(op, impl)] += 1
    return _kernels if impl.startswith("triton") else None


def backend_info() -> dict[str, dict[str, str]]:
    """Which implementation serves each op on each device type, for float32, float16 and
    bfloat16 inputs (float64 statistics always run in PyTorch), e.g. {"weighted_gram": {"cpu":
    "torch", "cuda": "triton"}, "ridge_solve": {"cpu": "cpp", "cuda": "cpp"}}. Asking builds
    featcal._C if needed. `served` counts the calls each implementation really took."""
    devices = [torch.device(dev) for dev in ("cpu", "cuda")]
    stats = {dev.type: _triton_serves(dev) for dev in devices}
    solver = {dev.type: _solver_serves(dev) for dev in devices}
    return {op: dict(stats if op in STATISTICS_OPS else solver) for op in OPS}


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_gram(
    x: Tensor,
    w: Tensor | None = None,
    out: Tensor | None = None,
    *,
    lower_only: bool = False,
    out_sum: Tensor | None = None,
    precision: str = "ieee",
) -> Tensor:
    """out += x^T diag(w) x for x of shape (n, d); returns out (d, d).

    With `out_sum`, also out_sum += sum_n w_n x_n in the same pass. With `lower_only`, only
    entries on and below the diagonal are sure to be accumulated; call `complete_gram(out)`
    once when accumulation is complete. `precision` is how the Triton kernels multiply float32
    inputs on a GPU (config.FLOAT32_PRECISIONS); PyTorch always multiplies in full float32.
    """
    x = _matrix(x, "x")
    n, d = x.shape
    out = _accumulator(out, (d, d), x)
    if out_sum is not None:
        _accumulator(out_sum, (d,), x)
    _check_weights(w, n)
    kernels = _kernels_for("weighted_gram", out, x)
    if kernels is not None:
        return kernels.weighted_gram(x, w, out, lower_only=lower_only, out_sum=out_sum, precision=precision)
    xa = x.to(out.dtype)
    xw = _apply_weights(xa, w)
    if out_sum is not None:
        out_sum.add_(xw.sum(0))
    if not lower_only or d < 2 * GRAM_TILE:
        return out.addmm_(xw.mT, xa)
    for start in range(0, d, GRAM_TILE):
        stop = min(start + GRAM_TILE, d)
        out[start:stop, :stop].addmm_(xw[:, start:stop].mT, xa[:, :stop])
    return out


def complete_gram(g: Tensor) -> Tensor:
    """Copy the strict lower triangle of a Gram accumulated with `lower_only` onto its upper
    triangle, in place; returns g."""
    kernels = _kernels_for("complete_gram", g, g)
    if kernels is not None:
        return kernels.mirror_lower(g)
    d = g.shape[-1]
    for start in range(0, d, GRAM_TILE):
        stop = min(start + GRAM_TILE, d)
        g[:start, start:stop].copy_(g[start:stop, :start].mT)
        block = g[start:stop, start:stop]
        block.copy_(block.tril() + block.tril(-1).mT)
    return g


def weighted_cross(
    x: Tensor,
    y: Tensor,
    w: Tensor | None = None,
    out: Tensor | None = None,
    *,
    out_sum_y: Tensor | None = None,
    precision: str = "ieee",
) -> Tensor:
    """out += x^T diag(w) y for x (n, dx) and y (n, dy); returns out (dx, dy).

    With `out_sum_y`, also out_sum_y += sum_n w_n y_n in the same pass; `precision` as in
    `weighted_gram`.
    """
    x = _matrix(x, "x")
    y = _matrix(y, "y")
    if y.shape[0] != x.shape[0]:
        raise FeatCalError(f"weighted_cross: x has {x.shape[0]} rows but y has {y.shape[0]}")
    out = _accumulator(out, (x.shape[1], y.shape[1]), x)
    if out_sum_y is not None:
        _accumulator(out_sum_y, (y.shape[1],), x)
    _check_weights(w, x.shape[0])
    kernels = _kernels_for("weighted_cross", out, x, y)
    if kernels is not None:
        return kernels.weighted_cross(x, y, w, out, out_sum_y=out_sum_y, precision=precision)
    ya = y.to(out.dtype)
    if out_sum_y is not None:
        _torch_weighted_sum(ya, w, out_sum_y)
    return out.addmm_(_apply_weights(x.to(out.dtype), w).mT, ya)


def weighted_sum(x: Tensor, w: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """out += sum_n w_n x_n for x (n, d); returns out (d,)."""
    x = _matrix(x, "x")
    out = _accumulator(out, (x.shape[1],), x)
    _check_weights(w, x.shape[0])
    kernels = _kernels_for("weighted_sum", out, x)
    if kernels is not None:
        return kernels.weighted_sum(x, w, out)
    return _torch_weighted_sum(x.to(out.dtype), w, out)


def _torch_weighted_sum(x: Tensor, w: Tensor | None, out: Tensor) -> Tensor:
    if w is None:
        return out.add_(x.sum(0))
    return out.addmv_(x.mT, w.to(out.dtype))


def norm_moments(
    x: Tensor,
    w: Tensor | None = None,
    *,
    rms: bool = False,
    eps: float = 1e-5,
    out_sum: Tensor | None = None,
    out_sq: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted first and second moments of the normalised tokens, without affine.

    z = layer_norm(x) (or x / rms(x) when `rms`); out_sum += sum_n w_n z_n and
    out_sq += sum_n w_n z_n^2, each of shape (d,). Returns (out_sum, out_sq).
    """
    x = _matrix(x, "x")
    d = x.shape[1]
    out_sum = _accumulator(out_sum, (d,), x)
    out_sq = _accumulator(out_sq, (d,), x)
    _check_weights(w, x.shape[0])
    kernels = _kernels_for("norm_moments", out_sum, x, out_sq)
    if kernels is not None:
        return kernels.norm_moments(x, w, out_sum, out_sq, rms=rms, eps=eps)
    xa = x.to(out_sum.dtype)
    if rms:
        z = torch.nn.functional.rms_norm(xa, (d,), eps=eps)
    else:
        z = torch.nn.functional.layer_norm(xa, (d,), eps=eps)
    xw = _apply_weights(z, w)
    out_sum.add_(xw.sum(0))
    out_sq.add_(xw.mul_(z).sum(0))
    return out_sum, out_sq


def _solver_serves(device: torch.device) -> str:
    """'cpp' (featcal._C) or 'torch' for ridge_solve and assemble on this device type."""
    if requested_backend() == "torch":
        return "torch"
    return "cpp" if extension.load() is not None else "torch"


def _extension_for(op: str, device: torch.device) -> ModuleType | None:
    impl = _solver_serves(device)
    served[(op, impl)] += 1
    return extension.load() if impl == "cpp" else None


def assemble(A: Tensor, G: Tensor, eps: float) -> float:
    """A += G / n with n = max(||G||_F, eps) (one task's Gram folded into a group's sum,
    docs/algorithm.md s.6); returns n. A is left untouched when n is 0."""
    if A.shape != G.shape or A.dtype != G.dtype:
        raise FeatCalError(
            f"assemble: A {tuple(A.shape)} {A.dtype} and G {tuple(G.shape)} {G.dtype} must match"
        )
    ext = _extension_for("assemble", A.device) if A.dtype in (torch.float32, torch.float64) else None
    if ext is not None:
        return ext.assemble(A, G, eps)
    # float64 sums of float32 squares, a band of rows at a time (no float64 copy of G), one sync
    total = torch.zeros((), dtype=torch.float64, device=G.device)
    for band in G.reshape(-1, G.shape[-1]).split(256):
        total += band.double().square().sum()
    n = max(math.sqrt(float(total)), eps)
    if n > 0:
        A.add_(G, alpha=1.0 / n)
    return n


def ridge_solve(
    A: Tensor, B: Tensor | Sequence[Tensor], ridge: float = 0.0, *, where: str | None = None
) -> Tensor:
    """Solve (A + ridge I) X = B for symmetric positive definite A (only its lower triangle is read).

    A: (..., d, d); B: (..., d, m) or (..., d), or a list of (..., d, m_i) right-hand sides
    solved side by side (X's columns in that order; featcal._C reads them without concatenating).
    Leading dimensions are a batch. Works in float64 if any input is float64, else float32, and
    returns that dtype. Cholesky first; a system whose factorisation fails is retried with
    diagonal jitter growing from 1e-10 to 1e-2 of its mean diagonal, then solved by an
    eigendecomposition pseudo-inverse. Each fallback step is logged at WARNING. featcal._C
    serves when it loads (in place, in one d x d workspace); the PyTorch implementation below
    otherwise. `where` (e.g. the block and modules) starts the fallback warnings.
    """
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise FeatCalError(f"ridge_solve: A must be square (..., d, d), got shape {tuple(A.shape)}")
    vector = isinstance(B, Tensor) and B.dim() == A.dim() - 1
    parts = [B.unsqueeze(-1) if vector else B] if isinstance(B, Tensor) else list(B)
    if not parts:
        raise FeatCalError("ridge_solve: no right-hand side given")
    for t in (A, *parts):
        if not t.is_floating_point():
            raise FeatCalError(f"ridge_solve: {'A' if t is A else 'B'} must be floating point, got {t.dtype}")
    for part in parts:
        if part.dim() != A.dim() or part.shape[:-1] != A.shape[:-1]:
            shape = tuple(B.shape) if vector else tuple(part.shape)
            raise FeatCalError(f"ridge_solve: B of shape {shape} does not fit A of shape {tuple(A.shape)}")
    ext = _extension_for("ridge_solve", A.device)
    if ext is None:
        X, steps = _torch_ridge_solve(A, parts[0] if len(parts) == 1 else torch.cat(parts, -1), ridge)
    else:
        try:
            X, steps = ext.ridge_solve(A, parts, float(ridge), list(JITTER_STEPS))
        except RuntimeError as exc:  # the extension's input checks
            raise FeatCalError(str(exc).strip().splitlines()[0]) from exc
    _log_fallbacks(steps, A.shape[-1], "ridge_solve" if where is None else f"{where}: ridge_solve")
    return X.squeeze(-1) if vector else X


def _log_fallbacks(steps: Tensor, d: int, who: str) -> None:
    """Log each jitter step tried and the systems left to the pseudo-inverse; `steps` holds per
    system the step that factorised it (0: none, k: JITTER_STEPS[k - 1], else pseudo-inverse)."""
    steps = steps.flatten()
    total = steps.numel()
    for k, rel in enumerate(JITTER_STEPS, start=1):
        tried = int((steps >= k).sum())
        if tried:
            log.warning(
                "%s: Cholesky failed for %d of %d systems (d=%d); retried with diagonal "
                "jitter %.0e x mean diagonal",
                who,
                tried,
                total,
                d,
                rel,
            )
    failed = int((steps > len(JITTER_STEPS)).sum())
    if failed:
        log.warning(
            "%s: %d of %d systems (d=%d) still fail with jitter; "
            "solving them by eigendecomposition pseudo-inverse",
            who,
            failed,
            total,
            d,
        )


def _torch_ridge_solve(A: Tensor, B: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """ridge_solve in PyTorch: (X, steps) for A (..., d, d) and B (..., d, m)."""
    dtype = torch.float64 if torch.float64 in (A.dtype, B.dtype) else torch.float32
    if not all_finite(A):
        raise FeatCalError(f"ridge_solve: A of shape {tuple(A.shape)} contains NaN or Inf")
    d = A.shape[-1]
    M = A.to(dtype=dtype, copy=True).reshape(-1, d, d)
    if ridge:
        M.diagonal(dim1=-2, dim2=-1).add_(ridge)
    rhs = B.to(dtype).reshape(M.shape[0], d, -1)
    L, info = torch.linalg.cholesky_ex(M)
    steps = torch.zeros(M.shape[0], dtype=torch.long)
    if (info != 0).any():
        L, steps = _jitter_cholesky(M, L, info != 0)
    X = torch.cholesky_solve(rhs, L)
    pinv = steps > len(JITTER_STEPS)
    if pinv.any():
        X[pinv] = _eigen_pinv_solve(M[pinv], rhs[pinv])
    return X.reshape(B.shape), steps


def _jitter_cholesky(M: Tensor, L: Tensor, failed: Tensor) -> tuple[Tensor, Tensor]:
    """Retry the failed systems of M (b, d, d) with growing jitter; (L, steps) after. Systems that
    still fail get the identity as a placeholder factor (they are solved by pseudo-inverse)."""
    L, steps = L.clone(), torch.zeros(M.shape[0], dtype=torch.long)
    todo = failed.nonzero().flatten().cpu()
    scale = M.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(M.dtype).tiny)
    for k, rel in enumerate(JITTER_STEPS, start=1):
        steps[todo] = k
        trial = M[todo]
        trial.diagonal(dim1=-2, dim2=-1).add_((rel * scale[todo]).unsqueeze(-1))
        Lt, info = torch.linalg.cholesky_ex(trial)
        ok = (info == 0).cpu()
        L[todo[ok]] = Lt[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return L, steps
    steps[todo] = len(JITTER_STEPS) + 1
    L[todo] = torch.eye(M.shape[-1], dtype=L.dtype, device=L.device)
    return L, steps


def _eigen_pinv_solve(M: Tensor, rhs: Tensor) -> Tensor:
    """X = pinv(M) rhs for symmetric M, dropping eigenvalues below d * eps * max|eigenvalue|."""
    evals, evecs = torch.linalg.eigh(M)
    tol = evals.abs().amax(-1, keepdim=True) * M.shape[-1] * torch.finfo(M.dtype).eps
    inv = torch.where(evals.abs() > tol, 1.0 / evals, torch.zeros_like(evals))
    return evecs @ (inv.unsqueeze(-1) * (evecs.mT @ rhs))


def all_finite(t: Tensor) -> bool:
    """No NaN or Inf in t. A NaN or Inf makes the sum non-finite; only then is each entry checked
    (the sum of finite entries can overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _matrix(x: Tensor, name: str) -> Tensor:
    if x.dim() != 2:
        raise FeatCalError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise FeatCalError(f"{name} must be floating point, got {x.dtype}")
    return x


def _accumulator(out: Tensor | None, shape: tuple[int, ...], x: Tensor) -> Tensor:
    if out is None:
        return torch.zeros(shape, dtype=accumulator_dtype(x.dtype), device=x.device)
    if tuple(out.shape) != shape:
        raise FeatCalError(f"out has shape {tuple(out.shape)}, expected {shape}")
    if out.dtype not in (torch.float32, torch.float64):
        raise FeatCalError(f"out must be float32 or float64, got {out.dtype}")
    return out


def _check_weights(w: Tensor | None, n: int) -> None:
    if w is not None and (w.dim() != 1 or w.shape[0] != n):
        raise FeatCalError(f"w must have shape ({n},), got {tuple(w.shape)}")


def _apply_weights(x: Tensor, w: Tensor | None) -> Tensor:
    return x if w is None else x * w.to(x.dtype).unsqueeze(1)
