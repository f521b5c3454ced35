"""The kernels' tuner (featcal.kernels.autotune): pruning by shared memory, timing on scratch
accumulators only, one choice per key. Its timer is a fake here; the launch path runs in the
interpreter with tuning switched on, so what the tuner does to the caller's output is checked
on the CPU."""

import pytest
import torch

kernels = pytest.importorskip("featcal.kernels")
from featcal.kernels import autotune, weighted_product  # noqa: E402
from featcal.kernels.autotune import TileConfig, Tuner  # noqa: E402

SMALL = TileConfig(32, 32, 32, 1, num_warps=4, num_stages=2)
WIDE = TileConfig(64, 128, 32, 2, num_warps=4, num_stages=3)
DEEP = TileConfig(128, 256, 64, 1, num_warps=8, num_stages=3)


class FakeTimer:
    """Runs each trial once and reports the next of the given times."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, trial):
        trial()
        self.calls += 1
        return self.times.pop(0)


def test_shared_memory_bound_counts_stages_a_converted_tile_and_barriers():
    assert SMALL.shared_memory(2, 2, float32_dot=False) == 2 * 32 * (32 * 2 + 32 * 2) + 1024
    assert DEEP.shared_memory(2, 4, float32_dot=True) == 3 * 64 * (128 * 2 + 256 * 4) + 4 * 64 * 256 + 1024
    assert DEEP.shared_memory(4, 4, float32_dot=True) > autotune.SHARED_MEMORY_LIMIT[90]


def test_fitting_drops_what_exceeds_the_limit():
    configs = [SMALL, WIDE, DEEP]
    assert autotune.fitting(configs, None, 4, 4, float32_dot=True) == configs
    limit = autotune.SHARED_MEMORY_LIMIT[80]
    kept = autotune.fitting(configs, limit, 4, 4, float32_dot=True)
    assert DEEP not in kept and SMALL in kept
    assert all(c.shared_memory(4, 4, float32_dot=True) <= limit for c in kept)
    assert autotune.fitting(configs, 1024, 4, 4, float32_dot=True) == []


def test_choose_times_each_candidate_once_and_remembers():
    timer = FakeTimer([3.0, 1.0, 2.0])
    tuner = Tuner(timer=timer)
    tried = []
    assert tuner.choose("k", lambda: [SMALL, WIDE, DEEP], tried.append) == WIDE
    assert tried == [SMALL, WIDE, DEEP] and timer.calls == 3
    assert tuner.timings["k"] == {SMALL: 3.0, WIDE: 1.0, DEEP: 2.0}
    assert tuner.choose("k", lambda: pytest.fail("asked again"), tried.append) == WIDE
    assert timer.calls == 3 and len(tried) == 3  # remembered: nothing timed again


def test_a_single_candidate_is_not_timed_and_none_is_an_error():
    timer = FakeTimer([])
    tuner = Tuner(timer=timer)
    assert tuner.choose("one", lambda: [SMALL], lambda c: pytest.fail("timed")) == SMALL
    with pytest.raises(RuntimeError, match="no tile configuration fits the device for none"):
        tuner.choose("none", lambda: [], lambda c: None)


def test_a_config_that_fails_to_launch_is_skipped():
    def trial(config):
        if config is not WIDE:
            raise autotune.OutOfResources(300_000, 232_448, "shared memory")

    tuner = Tuner(timer=FakeTimer([5.0, 5.0, 5.0]), failures=autotune.LAUNCH_FAILURES)
    assert tuner.choose("k", lambda: [SMALL, WIDE, DEEP], trial) == WIDE
    assert tuner.timings["k"][SMALL] == float("inf") and tuner.timings["k"][WIDE] == 5.0
    with pytest.raises(RuntimeError, match="no tile configuration could be launched for all"):
        tuner.choose("all", lambda: [SMALL, DEEP], trial)
    with pytest.raises(ValueError, match="a bug"):  # anything else is not a launch failure
        tuner.choose("bug", lambda: [SMALL, WIDE], lambda c: (_ for _ in ()).throw(ValueError("a bug")))


@pytest.mark.interpreter
def test_tuned_launch_leaves_the_output_to_the_chosen_config(monkeypatch):
    """With tuning on, the trials add into scratch, the caller's accumulator receives exactly one
    product, and a ragged batch of the same widths reuses the choice."""
    if not kernels.INTERPRETED:
        pytest.skip("runs the tuned launch path in the interpreter")
    timer = FakeTimer([2.0, 1.0, 3.0, 1.0, 2.0, 3.0])
    tuner = Tuner(timer=timer)
    monkeypatch.setattr(weighted_product, "TUNING", True)
    monkeypatch.setattr(weighted_product, "tuner", tuner)
    monkeypatch.setitem(weighted_product.CONFIGS, "ieee", [SMALL, WIDE, DEEP])
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(70, 40, generator=gen), torch.rand(70, generator=gen)
    start = torch.randn(40, 40, generator=gen)
    out = kernels.weighted_gram(x, w, start.clone())
    want = start.double() + weighted_product.reference(x, x, w)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-4)
    assert timer.calls == 3 and list(tuner.chosen.values()) == [WIDE]
    more = kernels.weighted_gram(x[:13], w[:13], out.clone())  # ragged: same key
    assert torch.allclose(
        more.double(), out.double() + weighted_product.reference(x[:13], x[:13], w[:13]), atol=1e-4
    )
    assert timer.calls == 3 and len(tuner.chosen) == 1
    kernels.weighted_cross(x, x[:, :7], w, torch.zeros(40, 7))  # new widths: a new key
    assert len(tuner.chosen) == 2


def test_no_shared_memory_limit_off_the_gpu():
    assert autotune.device_shared_memory(torch.device("cpu")) is None
