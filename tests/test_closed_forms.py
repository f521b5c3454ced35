"""The closed forms on cases whose answer is known without computing it."""

import copy

import pytest
from tiny_models import BERT, CLIP_VISION, make_data, make_experts, setup

from featcal import FeatCalConfig, calibrate
from featcal.models.modules import calibrated_modules


def _params(family, model):
    out = {}
    for index, block in enumerate(family.blocks(model)):
        for name, ref in calibrated_modules(block).items():
            out[f"{index}.{name}.weight"] = ref.module.weight.detach().clone()
            if ref.bias() is not None:
                out[f"{index}.{name}.bias"] = ref.module.bias.detach().clone()
    return out


def _assert_close(got: dict, want: dict, tol: float):
    assert got.keys() == want.keys()
    for key in want:
        err = ((got[key] - want[key]).norm() / want[key].norm()).item()
        assert err < tol, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("family", [CLIP_VISION, BERT], ids=lambda f: f.name)
def test_one_task_alpha_one_no_ridge_merged_equal_expert_gives_expert(family):
    base = family.build(0).double()
    expert = make_experts(base, 1)["task0"]
    merged = copy.deepcopy(expert)
    data = make_data(family, ["task0"], batches=4, size=8)  # more tokens than inputs: G_t invertible
    cfg = FeatCalConfig(teacher_interp_alpha=1.0, lambda_ratio=0.0, covariance_eps=0.0, progress=False)
    calibrate(merged, base=base, experts={"task0": expert}, data=data, config=cfg)
    _assert_close(_params(family, merged), _params(family, expert), 1e-8)


def test_infinite_ridge_gives_the_anchor():
    family = CLIP_VISION
    base, experts, merged, data = setup(family)
    rho = 1.7
    original = _params(family, merged)
    anchor = {
        k: rho * v + (1 - rho) * b for (k, v), b in zip(original.items(), _params(family, base).values())
    }
    cfg = FeatCalConfig(lambda_ratio=1e10, anchor_blend_rho=rho, progress=False)
    calibrate(merged, base=base, experts=experts, data=data, config=cfg)
    _assert_close(_params(family, merged), anchor, 1e-6)
    assert max(((original[k] - anchor[k]).norm() / anchor[k].norm()).item() for k in anchor) > 1e-3
