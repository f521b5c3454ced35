"""The module kinds FeatCal calibrates inside a block, and uniform access to their parameters.

- linear: `nn.Linear`, and HF `Conv1D` (a Linear whose weight is stored transposed, d_in x d_out);
  the weight is always seen as W of shape (d_out, d_in).
- layernorm: `nn.LayerNorm` with an affine (gamma, optional beta), or any module that computes it.
- rmsnorm: z * w with z = x / rms(x) (Llama, T5, Qwen, torch's `nn.RMSNorm`, ...).
- rmsnorm-offset: z * (1 + w) (Gemma): solved in the effective scale g = 1 + w, stored as w.

Norms are recognised by structure, not by class name (`norm_kind`): a module with a 1-D
`weight` and an `eps` or `variance_epsilon` is run once on a probe input with random
parameters, and its output is compared with each formula. One that matches none is
UNKNOWN_NORM: it keeps its merged value and the run reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LINEAR = "linear"
LAYERNORM = "layernorm"
RMSNORM = "rmsnorm"
OFFSET_RMSNORM = "rmsnorm-offset"
NORMS = (LAYERNORM, RMSNORM, OFFSET_RMSNORM)
UNKNOWN_NORM = "unknown-norm"  # looks like a norm, computes none of NORMS

ModuleKind = Callable[[nn.Module], str | None]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def module_kind(module: nn.Module) -> str | None:
    """LINEAR, one of NORMS, UNKNOWN_NORM, or None for modules FeatCal leaves as merged."""
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return LINEAR
    if isinstance(module, nn.LayerNorm):
        return LAYERNORM if module.weight is not None else None
    if isinstance(module, nn.RMSNorm):
        return RMSNORM if module.weight is not None else None
    return norm_kind(module)


_PROBED: dict[type, str | None] = {}


def norm_kind(module: nn.Module) -> str | None:
    """The norm formula a module computes, found on a probe input (cached per class); None for a
    module without a 1-D weight and an eps, UNKNOWN_NORM for one that matches no formula."""
    weight = getattr(module, "weight", None)
    eps_attr = next((a for a in ("eps", "variance_epsilon") if hasattr(module, a)), None)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or eps_attr is None:
        return None
    if type(module) not in _PROBED:
        _PROBED[type(module)] = _probe(module)
    return _PROBED[type(module)]


def _probe(module: nn.Module) -> str:
    d = module.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, d, generator=gen) * 3 + 1
    own = dict(module.named_parameters(recurse=False))
    probe = {name: torch.rand(p.shape, generator=gen) + 0.5 for name, p in own.items()}
    eps = _eps(module)
    try:
        for name, value in probe.items():
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        with torch.no_grad():
            got = module(x)
    except Exception:
        return UNKNOWN_NORM
    finally:
        for name, p in own.items():
            module._parameters[name] = p
    if not isinstance(got, Tensor) or got.shape != x.shape:
        return UNKNOWN_NORM
    w, b = probe["weight"], probe.get("bias")
    z = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    candidates = {LAYERNORM: F.layer_norm(x, (d,), w, b, eps)}
    if b is None:
        candidates.update({RMSNORM: z * w, OFFSET_RMSNORM: z * (1 + w)})
    for kind, want in candidates.items():
        if torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5):
            return kind
    return UNKNOWN_NORM


def _eps(module: nn.Module) -> float:
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    if eps is None:  # torch.nn.RMSNorm(eps=None) uses the dtype's machine epsilon
        eps = torch.finfo(module.weight.dtype).eps
    return float(eps)


@dataclass(frozen=True)
class ModuleRef:
    """One calibrated module of a block: its name inside the block, its kind and the module."""

    name: str
    kind: str
    module: nn.Module

    @property
    def d_in(self) -> int:
        if self.kind == LINEAR:
            return self.weight().shape[1]
        return self.module.weight.shape[-1]

    @property
    def d_out(self) -> int:
        return self.weight().shape[0]

    @property
    def is_rms(self) -> bool:
        """Whether the norm normalises by rms(x) alone (no centring)."""
        return self.kind in (RMSNORM, OFFSET_RMSNORM)

    def weight(self) -> Tensor:
        """Linear: W (d_out, d_in) as the math uses it (a view for Conv1D); norms: the stored weight."""
        if _is_conv1d(self.module):
            return self.module.weight.T
        return self.module.weight

    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    def params(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(W, or a norm's effective scale g, and the bias or None), cast to dtype and device."""
        b = self.bias()
        cast = {"dtype": dtype, "device": device}
        weight = self.weight().to(**cast)
        if self.kind == OFFSET_RMSNORM:
            weight = weight + 1
        return weight, None if b is None else b.to(**cast)

    def set_weight(self, value: Tensor) -> None:
        """Write W (d_out, d_in) (or a norm's effective scale) into the module, in its own layout
        and dtype."""
        if self.kind == OFFSET_RMSNORM:
            value = value - 1
        self.weight().copy_(value)

    def set_bias(self, value: Tensor) -> None:
        self.module.bias.copy_(value)

    def norm_eps(self) -> float:
        return _eps(self.module)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"weight": tuple(self.module.weight.shape)}
        if self.bias() is not None:
            shapes["bias"] = tuple(self.bias().shape)
        return shapes


def calibrated_modules(block: nn.Module, kind_of: ModuleKind = module_kind) -> dict[str, ModuleRef]:
    """Every module of the block FeatCal calibrates, by name inside the block, in definition order."""
    found = {}
    for name, module in block.named_modules():
        kind = kind_of(module) if name else None
        if kind is not None and kind != UNKNOWN_NORM:
            found[name] = ModuleRef(name, kind, module)
    return found


def unknown_norms(block: nn.Module, kind_of: ModuleKind = module_kind) -> dict[str, str]:
    """Modules of the block that look like norms but compute no known formula: name -> class."""
    return {
        name: type(module).__name__
        for name, module in block.named_modules()
        if name and kind_of(module) == UNKNOWN_NORM
    }
