"""The module kinds FeatCal calibrates inside a block, and uniform access to their parameters.

- linear: `nn.Linear`, and HF `Conv1D` (a Linear whose weight is stored transposed, d_in x d_out);
  the weight is always seen as W of shape (d_out, d_in).
- layernorm: `nn.LayerNorm` with an affine (gamma, optional beta), or any module that computes it.
- rmsnorm: z * w with z = x / rms(x) (Llama, T5, Qwen, torch's `nn.RMSNorm`, ...).
- rmsnorm-offset: z * (1 + w) (Gemma): solved in the effective scale g = 1 + w, stored as w.
- routed-experts: transformers 5's fused MoE experts (`gate_up_proj` (E, 2I, H), `down_proj`
  (E, H, I), `act_fn`; Mixtral, Qwen-MoE, OLMoE). Each expert e is two Linear maps, calibrated
  as two modules `NAME.gate_up_proj[e]` and `NAME.down_proj[e]`: views of one slot of the fused
  parameters (`ModuleRef.slot`). A MoE router (`...TopKRouter`, a weight (E, H) applied as
  F.linear) is a linear module.

Norms are recognised by structure, not by class name (`norm_kind`): a module with a 1-D
`weight` parameter and an `eps` or `variance_epsilon` is run once on a probe input with random
parameters, and its output is compared with each formula. One that matches none (or whose
forward fails on the probe) is UNKNOWN_NORM: it keeps its merged value and the run reports it.
Torch's BatchNorm and GroupNorm are UNKNOWN_NORM without a probe.
"""

from __future__ import annotations

import weakref
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
ROUTED_EXPERTS = "routed-experts"
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # the two maps of each routed expert, in call order

ModuleKind = Callable[[nn.Module], str | None]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _is_router(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return type(module).__name__.endswith("TopKRouter") and weight is not None and weight.dim() == 2


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's fused experts: 3-D gate_up_proj (E, 2I, H) and down_proj (E, H, I), act_fn."""
    params = [module._parameters.get(n) for n in EXPERT_PARAMETERS]
    if any(p is None or p.dim() != 3 for p in params) or not hasattr(module, "act_fn"):
        return False
    (experts, double, hidden), shape = params[0].shape, tuple(params[1].shape)
    return double % 2 == 0 and shape == (experts, hidden, double // 2)


def module_kind(module: nn.Module) -> str | None:
    """LINEAR, one of NORMS, ROUTED_EXPERTS, UNKNOWN_NORM, or None for modules FeatCal leaves
    as merged."""
    if isinstance(module, nn.Linear) or _is_conv1d(module) or _is_router(module):
        return LINEAR
    if is_fused_experts(module):
        return ROUTED_EXPERTS
    if isinstance(module, nn.LayerNorm):
        return LAYERNORM if module.weight is not None else None
    if isinstance(module, nn.RMSNorm):
        return RMSNORM if module.weight is not None else None
    return norm_kind(module)


_PROBED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
# Torch norms FeatCal does not calibrate: reported without a probe (which would touch running stats).
_OTHER_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def norm_kind(module: nn.Module) -> str | None:
    """The norm formula a module computes, found on a probe input (once per module); None for a
    module without a 1-D weight parameter and an eps, UNKNOWN_NORM for one that matches none."""
    weight = module._parameters.get("weight")
    has_eps = any(hasattr(module, a) for a in ("eps", "variance_epsilon"))
    if weight is None or weight.dim() != 1 or not has_eps:
        return None
    if isinstance(module, _OTHER_TORCH_NORMS):
        return UNKNOWN_NORM
    if module not in _PROBED:
        _PROBED[module] = _probe(module)
    return _PROBED[module]


def _probe(module: nn.Module) -> str:
    """Run the module's forward (no hooks, eval mode) with random parameters on a random input
    and compare with each formula; the module is left as it was."""
    d = module.weight.shape[0]
    device = module.weight.device if module.weight.device.type != "meta" else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, d, generator=gen) * 3 + 1).to(device)
    own = dict(module._parameters)
    probe = {
        n: (torch.rand(p.shape, generator=gen) + 0.5).to(device) for n, p in own.items() if p is not None
    }
    w, b, eps = probe["weight"], probe.get("bias"), _eps(module)
    z = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    candidates = {LAYERNORM: F.layer_norm(x, (d,), w, b, eps)}
    if b is None:
        candidates.update({RMSNORM: z * w, OFFSET_RMSNORM: z * (1 + w)})
    training = module.training
    try:
        module.training = False
        for name, value in probe.items():
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        with torch.no_grad():
            got = module.forward(x)
        for kind, want in candidates.items():
            if (
                isinstance(got, Tensor)
                and got.shape == x.shape
                and torch.allclose(got.to(want), want, 1e-4, 1e-5)
            ):
                return kind
    except Exception:  # a forward that fails on a plain (batch, tokens, d) input is no known norm
        pass
    finally:
        module._parameters.update(own)
        module.training = training
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
    """One calibrated module of a block: its name inside the block, its kind and the module.
    A routed expert's map is `slot` (the expert) of the fused 3-D `parameter` of `module`."""

    name: str
    kind: str
    module: nn.Module
    parameter: str = "weight"
    slot: int | None = None

    @property
    def routed(self) -> bool:
        return self.slot is not None

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
        if self.routed:
            return getattr(self.module, self.parameter)[self.slot]
        return self.module.weight

    def bias(self) -> Tensor | None:
        return None if self.routed else getattr(self.module, "bias", None)

    def params(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(W, or a norm's effective scale g, and the bias or None), cast to dtype and device."""
        weight = self.weight().to(dtype=dtype, device=device)
        if self.kind == OFFSET_RMSNORM:
            weight = weight + 1
        return weight, self.bias_as(dtype, device)

    def bias_as(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """The bias (or None), cast to dtype and device, without touching the weight."""
        b = self.bias()
        return None if b is None else b.to(dtype=dtype, device=device)

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
        stored = self.weight() if self.routed else self.module.weight
        shapes = {"weight": tuple(stored.shape)}
        if self.bias() is not None:
            shapes["bias"] = tuple(self.bias().shape)
        return shapes


def calibrated_modules(block: nn.Module, kind_of: ModuleKind = module_kind) -> dict[str, ModuleRef]:
    """Every module of the block FeatCal calibrates, by name inside the block, in definition order."""
    found = {}
    for name, module in block.named_modules():
        kind = kind_of(module) if name else None
        if kind == ROUTED_EXPERTS:
            found.update({r.name: r for r in routed_modules(name, module)})
        elif kind is not None and kind != UNKNOWN_NORM:
            found[name] = ModuleRef(name, kind, module)
    return found


def routed_fraction(block: nn.Module) -> float:
    """The share of a block's tokens each routed expert sees on average: top_k / experts of its
    router (1 without one)."""
    for module in block.modules():
        if _is_router(module) and isinstance(getattr(module, "top_k", None), int):
            return module.top_k / module.weight.shape[0]
    return 1.0


def routed_modules(name: str, module: nn.Module) -> list[ModuleRef]:
    """The Linear maps of fused experts: every expert's gate_up_proj, then every down_proj."""
    experts = getattr(module, EXPERT_PARAMETERS[0]).shape[0]
    return [
        ModuleRef(f"{name}.{parameter}[{e}]", LINEAR, module, parameter, e)
        for parameter in EXPERT_PARAMETERS
        for e in range(experts)
    ]


def unknown_norms(block: nn.Module, kind_of: ModuleKind = module_kind) -> dict[str, str]:
    """Modules of the block that look like norms but compute no known formula: name -> class."""
    return {
        name: type(module).__name__
        for name, module in block.named_modules()
        if name and kind_of(module) == UNKNOWN_NORM
    }
