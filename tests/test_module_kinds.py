"""Norms are found by what they compute, not by their class name: an RMSNorm class named nowhere
is calibrated exactly like a known one, a (1 + w) RMSNorm is solved in its effective scale, and
a module that looks like a norm but computes none of the formulas is reported, never silently
left merged."""

import copy

import pytest
import torch
from tiny_models import STACK_ADAPTER, Stack, make_experts, registered
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from featcal import FeatCalConfig, calibrate
from featcal.models.modules import (
    LAYERNORM,
    OFFSET_RMSNORM,
    RMSNORM,
    UNKNOWN_NORM,
    calibrated_modules,
    module_kind,
)

D = 16


class PlainRMSNorm(nn.Module):
    """x / rms(x) * w, written out, under a class name featcal has never seen."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class Qwen9RMSNorm(LlamaRMSNorm):
    """A subclass of a known norm with a new name (as each new HF family defines its own)."""


class OffsetRMSNorm(PlainRMSNorm):
    """x / rms(x) * (1 + w) (Gemma)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


class PlainLayerNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class ScaleWithEps(nn.Module):
    """Has a 1-D weight and an eps like a norm, but is a plain scale."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * self.weight + self.eps


class NormBlock(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm, self.fc = norm, nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(torch.tanh(self.norm(x)))


def _case(make_norm, seed=0):
    """(base, experts, merged, data) of a two-block Stack with `make_norm(D)` norms, float64."""
    torch.manual_seed(seed)
    base = Stack([NormBlock(make_norm(D)), NormBlock(make_norm(D))], D).double()
    with torch.no_grad():
        for block in base.blocks:
            block.norm.weight.copy_(
                0.2 * torch.randn(D) + (0 if isinstance(block.norm, OffsetRMSNorm) else 1)
            )
    experts = make_experts(base, 3)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            p.add_(0.3 * sum(dict(e.named_parameters())[name] - p for e in experts.values()))
    gen = torch.Generator().manual_seed(5)
    data = {
        t: [{"x": torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)} for _ in range(2)]
        for t in experts
    }
    return base, experts, merged, data


def _swap_norms(model, make_norm, weight=lambda w: w):
    """A copy of `model` whose norms are `make_norm(D)` with the weights `weight(w)`."""
    out = copy.deepcopy(model)
    for block in out.blocks:
        norm = make_norm(D).double()
        with torch.no_grad():
            norm.weight.copy_(weight(block.norm.weight))
        block.norm = norm
    return out


def _calibrated(base, experts, merged, data):
    model = copy.deepcopy(merged)
    with registered(STACK_ADAPTER):
        _, report = calibrate(
            model, base=base, experts=experts, data=data, config=FeatCalConfig(progress=False)
        )
    return model, report


def test_kinds_by_formula():
    assert module_kind(PlainRMSNorm(D)) == RMSNORM
    assert module_kind(Qwen9RMSNorm(D)) == RMSNORM
    assert module_kind(OffsetRMSNorm(D)) == OFFSET_RMSNORM
    assert module_kind(PlainLayerNorm(D)) == LAYERNORM
    assert module_kind(ScaleWithEps(D)) == UNKNOWN_NORM
    assert module_kind(nn.Dropout()) is None
    on_meta = PlainRMSNorm(D).to("meta")  # a lazily read skeleton's norm is probed too
    assert calibrated_modules(NormBlock(on_meta))["norm"].kind == RMSNORM


@pytest.mark.parametrize(
    ("unnamed", "known"),
    [(PlainRMSNorm, LlamaRMSNorm), (Qwen9RMSNorm, LlamaRMSNorm)],
    ids=["plain", "subclass"],
)
def test_an_rmsnorm_named_nowhere_is_calibrated_like_a_known_one(unnamed, known):
    base, experts, merged, data = _case(unnamed)
    got, _ = _calibrated(base, experts, merged, data)
    swap = lambda m: _swap_norms(m, lambda d: known(d, eps=1e-6))  # noqa: E731
    want, _ = _calibrated(swap(base), {t: swap(e) for t, e in experts.items()}, swap(merged), data)
    for block, reference, before in zip(got.blocks, want.blocks, merged.blocks):
        torch.testing.assert_close(block.norm.weight, reference.norm.weight, rtol=1e-10, atol=1e-12)
        assert (block.norm.weight - before.norm.weight).norm() > 1e-4 * before.norm.weight.norm()


def test_a_one_plus_w_norm_is_solved_in_its_effective_scale():
    base, experts, merged, data = _case(OffsetRMSNorm)
    got, _ = _calibrated(base, experts, merged, data)
    swap = lambda m: _swap_norms(m, PlainRMSNorm, weight=lambda w: 1 + w)  # noqa: E731
    want, _ = _calibrated(swap(base), {t: swap(e) for t, e in experts.items()}, swap(merged), data)
    for block, reference, before in zip(got.blocks, want.blocks, merged.blocks):
        torch.testing.assert_close(1 + block.norm.weight, reference.norm.weight, rtol=1e-10, atol=1e-12)
        assert (block.norm.weight - before.norm.weight).norm() > 1e-4 * before.norm.weight.norm()


def test_a_norm_look_alike_is_reported_and_left_merged():
    base, experts, merged, data = _case(ScaleWithEps)
    got, report = _calibrated(base, experts, merged, data)
    (warning,) = [w for w in report.warnings if "ScaleWithEps" in w]
    assert "'norm'" in warning and "keeps its merged values" in warning
    for block, before in zip(got.blocks, merged.blocks):
        assert torch.equal(block.norm.weight, before.norm.weight)
        assert not torch.equal(block.fc.weight, before.fc.weight)
