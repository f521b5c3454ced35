"""The module kinds FeatCal calibrates inside a block, and uniform access to their parameters.

- linear: `nn.Linear`, and HF `Conv1D` (a Linear whose weight is stored transposed, d_in x d_out);
  the weight is always seen as W of shape (d_out, d_in).
- layernorm: `nn.LayerNorm` with an affine (gamma, optional beta).
- rmsnorm: RMSNorm variants with `weight` and `eps` / `variance_epsilon` (Llama, T5, torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

LINEAR = "linear"
LAYERNORM = "layernorm"
RMSNORM = "rmsnorm"

# Norms computed as x / rms(x) * weight. Gemma-style norms scale by (1 + weight) and are not here.
_RMSNORM_CLASSES = ("RMSNorm", "T5LayerNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def module_kind(module: nn.Module) -> str | None:
    """LINEAR, LAYERNORM, RMSNORM, or None for modules FeatCal leaves as merged."""
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return LINEAR
    if isinstance(module, nn.LayerNorm):
        return LAYERNORM if module.weight is not None else None
    if isinstance(module, nn.RMSNorm) or type(module).__name__ in _RMSNORM_CLASSES:
        return RMSNORM if getattr(module, "weight", None) is not None else None
    return None


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

    def weight(self) -> Tensor:
        """Linear: W (d_out, d_in) as the math uses it (a view for Conv1D); norms: gamma."""
        if _is_conv1d(self.module):
            return self.module.weight.T
        return self.module.weight

    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    def params(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(weight as `weight()` gives it, bias or None), cast to dtype and device."""
        b = self.bias()
        cast = {"dtype": dtype, "device": device}
        return self.weight().to(**cast), None if b is None else b.to(**cast)

    def set_weight(self, value: Tensor) -> None:
        """Write W (d_out, d_in) (or gamma) into the module, in its own layout and dtype."""
        self.weight().copy_(value)

    def set_bias(self, value: Tensor) -> None:
        self.module.bias.copy_(value)

    def norm_eps(self) -> float:
        eps = getattr(self.module, "eps", None)
        if eps is None:
            eps = getattr(self.module, "variance_epsilon", None)
        if eps is None:  # torch.nn.RMSNorm(eps=None) uses the dtype's machine epsilon
            eps = torch.finfo(self.module.weight.dtype).eps
        return float(eps)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"weight": tuple(self.module.weight.shape)}
        if self.bias() is not None:
            shapes["bias"] = tuple(self.bias().shape)
        return shapes


def calibrated_modules(block: nn.Module) -> dict[str, ModuleRef]:
    """Every module of the block FeatCal calibrates, by name inside the block, in definition order."""
    found = {}
    for name, module in block.named_modules():
        kind = module_kind(module) if name else None
        if kind is not None:
            found[name] = ModuleRef(name, kind, module)
    return found
