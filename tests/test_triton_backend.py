"""featcal.ops dispatching to the Triton kernels, and a whole calibration served by them.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py).
"""

import copy

import pytest
import torch
from tiny_models import CLIP_VISION, MIXTRAL, QWEN3, STACK_ADAPTER, TOY_KINDS, features, registered, setup

from featcal import FeatCalConfig, calibrate, ops
from featcal.errors import FeatCalError

kernels = pytest.importorskip("featcal.kernels")
pytestmark = pytest.mark.interpreter


@pytest.fixture
def triton_backend(monkeypatch):
    if not kernels.INTERPRETED:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    monkeypatch.setenv("FEATCAL_BACKEND", "triton")


def _served_by(impl):
    return {op: n for (op, how), n in ops.served.items() if how == impl}


def test_backend_info_names_the_interpreter(triton_backend):
    info = ops.backend_info()
    for op in ops.STATISTICS_OPS:
        assert info[op] == {"cpu": "triton-interpreter", "cuda": "triton-interpreter"}


def test_auto_keeps_cpu_tensors_on_torch(monkeypatch):
    monkeypatch.setenv("FEATCAL_BACKEND", "auto")
    assert all(ops.backend_info()[op]["cpu"] == "torch" for op in ops.STATISTICS_OPS)
    before = _served_by("torch").get("weighted_gram", 0)
    ops.weighted_gram(torch.randn(5, 3))
    assert _served_by("torch")["weighted_gram"] == before + 1


def test_ops_reach_the_kernels_and_agree_with_torch(triton_backend, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(77, 40, generator=gen), torch.randn(77, 24, generator=gen)
    w = torch.rand(77, generator=gen)
    before = _served_by("triton-interpreter")
    got = {
        "gram": ops.complete_gram(
            ops.weighted_gram(x, w, lower_only=True, out_sum=(gsum := torch.zeros(40)))
        ),
        "gsum": gsum,
        "cross": ops.weighted_cross(x, y, w, out_sum_y=(ysum := torch.zeros(24))),
        "ysum": ysum,
        "sum": ops.weighted_sum(x, w),
        "norm": torch.cat(ops.norm_moments(x, w, rms=True, eps=1e-6)),
    }
    after = _served_by("triton-interpreter")
    assert all(after.get(op, 0) == before.get(op, 0) + 1 for op in ops.STATISTICS_OPS)
    monkeypatch.setenv("FEATCAL_BACKEND", "torch")
    want = {
        "gram": ops.weighted_gram(x, w, out_sum=(gsum := torch.zeros(40))),
        "gsum": gsum,
        "cross": ops.weighted_cross(x, y, w, out_sum_y=(ysum := torch.zeros(24))),
        "ysum": ysum,
        "sum": ops.weighted_sum(x, w),
        "norm": torch.cat(ops.norm_moments(x, w, rms=True, eps=1e-6)),
    }
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


def test_float64_stays_on_torch(triton_backend):
    before = _served_by("torch").get("weighted_gram", 0)
    out = ops.weighted_gram(torch.randn(9, 4, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert _served_by("torch")["weighted_gram"] == before + 1


def test_forced_triton_without_interpreter_is_refused(triton_backend, monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(FeatCalError, match="TRITON_INTERPRET=1"):
        ops.weighted_gram(torch.randn(9, 4))


def _calibrate_both(family, monkeypatch, **config):
    base, experts, merged, data = setup(family, dtype=torch.float32)
    cfg = FeatCalConfig(progress=False, **config)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FEATCAL_BACKEND", backend)
        before = _served_by("triton-interpreter")
        model, _ = calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg)
        used = {op for op, n in _served_by("triton-interpreter").items() if n > before.get(op, 0)}
        results[backend] = model, used
    (torch_model, torch_used), (triton_model, triton_used) = results["torch"], results["triton"]
    assert not torch_used
    for (name, got), want in zip(triton_model.named_parameters(), torch_model.parameters()):
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, f"{name}: relative difference {err:.1e}"
    gen = torch.Generator().manual_seed(5)
    batches = [family.make_batch(gen, 3)]
    got, want = features(family, triton_model, batches), features(family, torch_model, batches)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    moved = features(family, merged, batches)
    assert ((want - moved).norm() / moved.norm()).item() > 1e-4  # calibration did something
    return triton_used


@pytest.mark.parametrize("method", ["cross", "project"])
def test_calibrate_with_triton_equals_torch(triton_backend, monkeypatch, method):
    used = _calibrate_both(CLIP_VISION, monkeypatch, cross_method=method)
    assert {"weighted_gram", "complete_gram", "weighted_cross", "norm_moments"} <= used


def test_calibrate_rmsnorm_and_conv1d_with_triton_equals_torch(triton_backend, monkeypatch):
    with registered(STACK_ADAPTER):
        used = _calibrate_both(TOY_KINDS, monkeypatch, cross_method="project")
    assert "norm_moments" in used


def test_sequential_statistics_with_triton_equal_torch(triton_backend, monkeypatch):
    used = _calibrate_both(CLIP_VISION, monkeypatch, sequential="group")
    assert {"weighted_gram", "weighted_cross", "norm_moments"} <= used


@pytest.mark.parametrize("family", [QWEN3, MIXTRAL], ids=lambda f: f.name)
def test_head_norms_and_routed_experts_with_triton_equal_torch(triton_backend, monkeypatch, family):
    """Per-head norm rows (weights repeated over heads) and routed experts' gathered rows."""
    used = _calibrate_both(family, monkeypatch)
    assert {"weighted_gram", "weighted_cross", "norm_moments"} <= used
