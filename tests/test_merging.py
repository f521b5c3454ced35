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


def test_task_arithmetic_on_checkpoints_equals_in_memory_and_reads_in_groups(tmp_path, monkeypatch):
    from featcal.io.lazy_checkpoint import LazyCheckpoint
    from featcal.merging import task_arithmetic_checkpoints

    base = CLIP_VISION.build(0).to(torch.bfloat16)
    experts = make_experts(base, 3)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    for task, expert in experts.items():
        expert.save_pretrained(tmp_path / task)
    reads = []
    original = LazyCheckpoint.read

    def recording(self, keys, *args, **kwargs):
        keys = list(keys)
        reads.append(sum(self.nbytes([k]) for k in keys))
        return original(self, keys, *args, **kwargs)

    monkeypatch.setattr(LazyCheckpoint, "read", recording)
    group = 16 * 1024
    out = tmp_path / "merged"
    task_arithmetic_checkpoints(tmp_path / "base", {t: tmp_path / t for t in experts}, out, 0.4, group)
    monkeypatch.undo()

    want = task_arithmetic(base, experts, scaling=0.4).state_dict()
    got = LazyCheckpoint(out)
    largest = max(got.nbytes([k]) for k in got.keys())
    assert len(reads) > 3 * 4 and max(reads) <= max(group, largest)
    assert (out / "config.json").is_file()
    for key in got.keys():
        (value,) = got.read([key]).values()
        assert value.dtype == torch.bfloat16 and torch.equal(value, want[key]), key


def test_task_arithmetic_on_checkpoints_names_a_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    from featcal.merging import task_arithmetic_checkpoints

    base = CLIP_VISION.build(0)
    base.save_pretrained(tmp_path / "base")
    state = {k: v for k, v in base.state_dict().items() if not k.endswith("layers.1.mlp.fc1.weight")}
    (tmp_path / "e").mkdir()
    save_file(state, tmp_path / "e" / "model.safetensors")
    with pytest.raises(
        FeatCalError, match=r"expert 'e' has no tensor 'encoder\.layers\.1\.mlp\.fc1\.weight'"
    ):
        task_arithmetic_checkpoints(tmp_path / "base", {"e": tmp_path / "e"}, tmp_path / "out")
