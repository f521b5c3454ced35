"""calibrate() against the independent float64 implementation of docs/algorithm.md (reference_impl).

Every family is calibrated in float64 by both; each block's parameters must agree within 1e-6
relative and the final features within 1e-5. The float32 run must stay within 1e-5 of float64.
"""

import copy

import pytest
import torch
from reference_impl import reference_calibrate
from tiny_models import (
    BERT,
    CLIP_VISION,
    FAMILIES,
    STACK_ADAPTER,
    TOY_KINDS,
    features,
    make_data,
    registered,
    setup,
)
from torch import nn

from featcal import FeatCalConfig, calibrate, ops
from featcal.pipeline import statistics


def _fresh_batches(family, seed=99):
    gen = torch.Generator().manual_seed(seed)
    return [family.make_batch(gen, 4) for _ in range(2)]


def _compare(family, ours, ref, merged, weight_tol=1e-6, feature_tol=1e-5):
    for index, (ob, rb, mb) in enumerate(zip(family.blocks(ours), family.blocks(ref), family.blocks(merged))):
        mine, theirs, before = ob.state_dict(), rb.state_dict(), mb.state_dict()
        for name, expected in theirs.items():
            err = (mine[name] - expected).norm() / expected.norm().clamp_min(1e-12)
            assert err < weight_tol, f"block {index} {name}: relative error {err:.2e}"
        # the comparison is not vacuous: calibration moved the weights
        moved = max(
            ((mine[n] - before[n]).norm() / before[n].norm()).item()
            for n in theirs
            if n.endswith("weight") and before[n].dim() == 2
        )
        assert moved > 1e-4, f"block {index}: calibration left the weights unchanged"
    batches = _fresh_batches(family)
    got, want = features(family, ours, batches), features(family, ref, batches)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < feature_tol, f"final features: relative error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_matches_reference_float64(family):
    base, experts, merged, data = setup(family)
    cfg = FeatCalConfig(progress=False)
    ours, ref = copy.deepcopy(merged), copy.deepcopy(merged)
    model, report = calibrate(ours, base=base, experts=experts, data=data, config=cfg)
    assert model is ours
    reference_calibrate(family, ref, base, experts, data, cfg)
    _compare(family, ours, ref, merged)
    assert len(report.blocks) == len(family.blocks(merged))


@pytest.mark.parametrize("method", ["cross", "project"])
@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_every_cross_method_matches_reference(method, alpha):
    family = CLIP_VISION
    base, experts, merged, data = setup(family)
    cfg = FeatCalConfig(progress=False, cross_method=method, teacher_interp_alpha=alpha)
    ours, ref = copy.deepcopy(merged), copy.deepcopy(merged)
    calibrate(ours, base=base, experts=experts, data=data, config=cfg)
    reference_calibrate(family, ref, base, experts, data, cfg)
    _compare(family, ours, ref, merged)


def test_project_token_by_token_matches_reference(monkeypatch):
    """With fewer tokens than inputs, 'project' folds (1 - alpha) x_s W^T in token by token."""
    per_token = []
    original = statistics.TaskSums.zeros

    def spy(*args, **kwargs):
        sums = original(*args, **kwargs)
        per_token.extend(g.per_token for g in sums.groups if isinstance(g, statistics.ProjectSums))
        return sums

    monkeypatch.setattr(statistics.TaskSums, "zeros", spy)
    family = CLIP_VISION
    base, experts, merged, _ = setup(family)
    data = make_data(family, list(experts), batches=1, size=1)
    cfg = FeatCalConfig(progress=False, cross_method="project")
    ours, ref = copy.deepcopy(merged), copy.deepcopy(merged)
    calibrate(ours, base=base, experts=experts, data=data, config=cfg)
    reference_calibrate(family, ref, base, experts, data, cfg)
    assert per_token and all(per_token)
    _compare(family, ours, ref, merged)


def test_tiled_gram_matches_reference(monkeypatch):
    monkeypatch.setattr(ops, "GRAM_TILE", 8)  # d = 32 and 64 then use lower-triangle tiles
    family = CLIP_VISION
    base, experts, merged, data = setup(family)
    cfg = FeatCalConfig(progress=False)
    ours, ref = copy.deepcopy(merged), copy.deepcopy(merged)
    calibrate(ours, base=base, experts=experts, data=data, config=cfg)
    reference_calibrate(family, ref, base, experts, data, cfg)
    _compare(family, ours, ref, merged)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(calibrate_bias=False),
        dict(calibrate_layernorm=False),
        dict(lambda_ratio=0.0),
        dict(lambda_ratio=0.7, anchor_blend_rho=1.0, covariance_eps=1e-3),
    ],
    ids=["no-bias", "no-layernorm", "no-ridge", "other-hyperparameters"],
)
def test_switches_and_hyperparameters_match_reference(overrides):
    family = CLIP_VISION
    base, experts, merged, data = setup(family)
    cfg = FeatCalConfig(progress=False, **overrides)
    ours, ref = copy.deepcopy(merged), copy.deepcopy(merged)
    calibrate(ours, base=base, experts=experts, data=data, config=cfg)
    reference_calibrate(family, ref, base, experts, data, cfg)
    _compare(family, ours, ref, merged)
    for ob, mb in zip(family.blocks(ours), family.blocks(merged)):
        for name, module in ob.named_modules():
            original = mb.get_submodule(name)
            if isinstance(module, nn.Linear) and not cfg.calibrate_bias:
                assert torch.equal(module.bias, original.bias), name
            if isinstance(module, nn.LayerNorm) and not cfg.calibrate_layernorm:
                assert torch.equal(module.weight, original.weight), name
                assert torch.equal(module.bias, original.bias), name


@pytest.mark.parametrize("family", [CLIP_VISION, BERT], ids=lambda f: f.name)
def test_float32_run_stays_close_to_float64_reference(family):
    base, experts, merged, data = setup(family)
    cfg = FeatCalConfig(progress=False)
    ref = copy.deepcopy(merged)
    reference_calibrate(family, ref, base, experts, data, cfg)
    ours = copy.deepcopy(merged).float()
    experts32 = {t: copy.deepcopy(e).float() for t, e in experts.items()}
    calibrate(ours, base=copy.deepcopy(base).float(), experts=experts32, data=data, config=cfg)
    batches = _fresh_batches(family)
    got, want = features(family, ours, batches), features(family, ref, batches)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("method", ["cross", "project"])
def test_rmsnorm_conv1d_and_bias_free_modules_match_reference(method):
    family = TOY_KINDS
    with registered(STACK_ADAPTER):
        _check_toy_kinds(family, method)


def _check_toy_kinds(family, method):
    base, experts, merged, data = setup(family)
    cfg = FeatCalConfig(progress=False, cross_method=method)
    ours, ref = copy.deepcopy(merged), copy.deepcopy(merged)
    _, report = calibrate(ours, base=base, experts=experts, data=data, config=cfg)
    reference_calibrate(family, ref, base, experts, data, cfg)
    _compare(family, ours, ref, merged)
    assert not report.warnings


@pytest.mark.parametrize("sequential", ["sublayer", "group"])
@pytest.mark.parametrize("family", [*FAMILIES, TOY_KINDS], ids=lambda f: f.name)
def test_sequential_statistics_match_reference(family, sequential):
    """Each step's statistics taken from the block as the steps before it left it (s.12)."""
    with registered(STACK_ADAPTER):
        base, experts, merged, data = setup(family)
        cfg = FeatCalConfig(progress=False, sequential=sequential)
        ours, ref, one_pass = copy.deepcopy(merged), copy.deepcopy(merged), copy.deepcopy(merged)
        _, report = calibrate(ours, base=base, experts=experts, data=data, config=cfg)
        reference_calibrate(family, ref, base, experts, data, cfg, sequential=sequential)
        _compare(family, ours, ref, merged)
        # the steps changed the result: it is not the one-pass method's
        reference_calibrate(family, one_pass, base, experts, data, cfg)
        got, once = (
            features(family, ours, _fresh_batches(family)),
            features(family, one_pass, _fresh_batches(family)),
        )
        assert ((got - once).norm() / once.norm()).item() > 1e-6
    steps = [len(b.steps) for b in report.blocks]
    if sequential == "sublayer":
        assert steps == [3 if family is TOY_KINDS else 2] * len(steps)
    else:  # q/k/v, out, fc1, fc2 and two norms (three groups in the toy's MLP; CLIP's last q alone)
        assert min(steps) >= 6 and max(steps) <= 7
