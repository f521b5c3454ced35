"""Task Arithmetic and TIES on state dicts and modules."""

import pytest
import torch
from tiny_models import CLIP_VISION, make_experts

from featcal import FeatCalError, task_arithmetic, ties_merging


def _state(**tensors):
    return {k: torch.tensor(v) for k, v in tensors.items()}


def test_task_arithmetic_on_state_dicts():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=gen), "steps": torch.tensor([7])}
    experts = {t: {"w": torch.randn(4, 3, generator=gen), "steps": torch.tensor([9])} for t in "abc"}
    merged = task_arithmetic(base, experts, scaling=0.4)
    want = base["w"] + 0.4 * sum(e["w"] - base["w"] for e in experts.values())
    assert torch.allclose(merged["w"], want, atol=1e-6)
    assert torch.equal(merged["steps"], base["steps"])  # integer tensors are taken from the base


def test_task_arithmetic_on_modules_returns_a_new_module():
    base = CLIP_VISION.build(0)
    experts = make_experts(base, 2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = task_arithmetic(base, experts, scaling=0.3)
    assert type(merged) is type(base) and merged is not base
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key])
        if value.is_floating_point():
            want = value + 0.3 * sum(e.state_dict()[key] - value for e in experts.values())
            assert torch.allclose(merged.state_dict()[key], want, atol=1e-6)


def test_ties_known_answer():
    base = _state(w=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    experts = {
        "a": _state(w=[1.0, -2.0, 0.1, 3.0, 0.0, -0.2]),
        "b": _state(w=[2.0, 1.0, -0.1, -1.0, 0.5, 0.0]),
        "c": _state(w=[-1.0, -1.0, 0.2, 2.0, 0.0, 0.3]),
    }
    # density 0.5 keeps the 3 largest magnitudes of each task vector:
    #   a: 1, -2, 3      b: 2, 1, -1 (with 0.5 dropped)      c: -1, -1, 2 (0.3 dropped; ties at 1 kept)
    merged = ties_merging(base, experts, scaling=1.0, density=0.5)
    # entry 0: 1 + 2 - 1 > 0 -> mean(1, 2); entry 1: -2 + 1 - 1 < 0 -> mean(-2, -1)
    # entry 3: 3 - 1 + 2 > 0 -> mean(3, 2); entries 2, 4, 5 trimmed everywhere -> 0
    want = torch.tensor([1.5, -1.5, 0.0, 2.5, 0.0, 0.0])
    assert torch.allclose(merged["w"], want)
    half = ties_merging(base, experts, scaling=0.5, density=0.5)
    assert torch.allclose(half["w"], 0.5 * want)


def test_merge_errors_name_task_key_and_shapes():
    base = _state(w=[1.0, 2.0])
    with pytest.raises(FeatCalError, match=r"expert 'x' has no tensor 'w'"):
        task_arithmetic(base, {"x": _state(v=[1.0, 2.0])})
    with pytest.raises(FeatCalError, match=r"expert 'y': tensor 'w' has shape \(3,\) but \(2,\) in the base"):
        ties_merging(base, {"y": _state(w=[1.0, 2.0, 3.0])})
    with pytest.raises(FeatCalError, match="density must be in"):
        ties_merging(base, {"y": base}, density=0.0)
    with pytest.raises(FeatCalError, match="no experts"):
        task_arithmetic(base, {})
