"""Task Arithmetic and TIES on state dicts and modules."""

import math

import pytest
import torch
from tiny_models import CLIP_VISION, make_experts

from featcal import FeatCalError, task_arithmetic, ties_merging
from featcal.io.lazy_checkpoint import LazyCheckpoint
from featcal.merging import MergeRecipe, kth_largest, merge_checkpoints, merge_states


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


@pytest.mark.parametrize(
    "recipe",
    [
        MergeRecipe("ta", 0.4),
        MergeRecipe("ta", 0.5, weights={"task0": 0.2, "task2": -0.7}),
        MergeRecipe("ties", 1.0, 0.3),
        MergeRecipe("ties", 0.8, 0.3, "per-tensor", weights={"task1": 2.5}),
    ],
    ids=["ta", "ta-weights", "ties-global", "ties-per-tensor-weights"],
)
def test_checkpoint_merges_equal_in_memory_and_read_in_groups(tmp_path, monkeypatch, recipe):
    from featcal.io.lazy_checkpoint import LazyCheckpoint

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
    merge_checkpoints(tmp_path / "base", {t: tmp_path / t for t in experts}, out, recipe, group)
    monkeypatch.undo()

    if recipe.method == "ta":
        want = task_arithmetic(base, experts, recipe.scaling, recipe.weights).state_dict()
    else:
        args = (recipe.scaling, recipe.density, recipe.trim, recipe.weights)
        want = ties_merging(base, experts, *args).state_dict()
    got = LazyCheckpoint(out)
    largest = max(got.nbytes([k]) for k in got.keys())
    assert len(reads) > 3 * 4 and max(reads) <= max(group, largest)
    assert (out / "config.json").is_file()
    for key in got.keys():
        (value,) = got.read([key]).values()
        assert value.dtype == torch.bfloat16 and torch.equal(value, want[key]), key


def test_checkpoint_merge_names_a_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    base = CLIP_VISION.build(0)
    base.save_pretrained(tmp_path / "base")
    state = {k: v for k, v in base.state_dict().items() if not k.endswith("layers.1.mlp.fc1.weight")}
    (tmp_path / "e").mkdir()
    save_file(state, tmp_path / "e" / "model.safetensors")
    with pytest.raises(
        FeatCalError, match=r"expert 'e' has no tensor 'encoder\.layers\.1\.mlp\.fc1\.weight'"
    ):
        merge_checkpoints(tmp_path / "base", {"e": tmp_path / "e"}, tmp_path / "out", MergeRecipe())


def _ties_reference(base, experts, scaling, density, trim, weights):
    """TIES in float64 written out entry by entry over flattened task vectors."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    flat = {t: torch.cat([(e[k] - base[k]).double().flatten() for k in keys]) for t, e in experts.items()}
    kept = {}
    for task, tau in flat.items():
        if trim == "global":
            order = tau.abs().argsort(descending=True)
            threshold = tau.abs()[order[math.ceil(density * tau.numel()) - 1]]
            kept[task] = torch.where(tau.abs() >= threshold, tau, 0.0)
        else:
            parts, start = [], 0
            for key in keys:
                n = base[key].numel()
                piece = tau[start : start + n]
                keep = piece.abs().argsort(descending=True)[: max(1, int(density * n))]
                parts.append(torch.zeros_like(piece).index_copy(0, keep, piece[keep]))
                start += n
            kept[task] = torch.cat(parts)
    d = {t: weights.get(t, 1.0) * v for t, v in kept.items()}
    total = sum(d.values())
    out, start = {}, 0
    for key in keys:
        n = base[key].numel()
        num = torch.zeros(n, dtype=torch.float64)
        den = torch.zeros(n, dtype=torch.float64)
        for t in experts:
            piece, sign = d[t][start : start + n], torch.where(total[start : start + n] >= 0, 1.0, -1.0)
            agree = piece.sign() == sign
            num += torch.where(agree, piece, 0.0)
            den += agree.double() * weights.get(t, 1.0)
        den[den == 0] = 1
        out[key] = base[key].double() + scaling * (num / den).view(base[key].shape)
        start += n
    return out


@pytest.mark.parametrize("trim", ["global", "per-tensor"])
def test_ties_weighted_equals_an_entrywise_reference(trim):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    shapes = {"a": (7, 5), "b": (11,), "c": (3, 2, 4)}
    base = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    experts = {
        t: {k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()} for t in "xyz"
    }
    weights = {"x": 0.5, "y": 1.7}
    got = ties_merging(base, experts, 0.9, 0.37, trim, weights)
    want = _ties_reference(base, experts, 0.9, 0.37, trim, weights)
    for key in shapes:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)
    other = ties_merging(base, experts, 0.9, 0.37, "per-tensor" if trim == "global" else "global", weights)
    assert any(not torch.equal(other[k], got[k]) for k in shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_equals_kthvalue(dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(10):
        chunks = [
            {
                "a": torch.randn(int(torch.randint(1, 400, ())), generator=gen, dtype=dtype).abs() * 1e-3,
                "b": torch.randint(0, 4, (200,), generator=gen).to(dtype),  # many equal values
            }
            for _ in range(3)
        ]
        density = float(torch.rand((), generator=gen))
        got = kth_largest(lambda c=chunks: c, ["a", "b"], density, dtype)
        for task in "ab":
            values = torch.cat([c[task] for c in chunks])
            k = max(1, math.ceil(density * values.numel()))
            assert got[task] == torch.kthvalue(values, values.numel() - k + 1).values


@pytest.mark.parametrize("method", ["ta", "ties"])
def test_merge_refuses_non_finite_experts(tmp_path, method):
    base = CLIP_VISION.build(0)
    expert = make_experts(base, 1)["task0"]
    with torch.no_grad():
        expert.encoder.layers[1].mlp.fc2.weight[3, 4] = float("nan")
    with pytest.raises(
        FeatCalError, match=r"expert 'math': tensor 'encoder\.layers\.1\.mlp\.fc2\.weight' holds 1 NaN"
    ):
        merge_states(base, {"math": expert}, MergeRecipe(method))
    base.save_pretrained(tmp_path / "base")
    expert.save_pretrained(tmp_path / "math")
    with pytest.raises(FeatCalError, match="holds 1 NaN or infinite"):
        merge_checkpoints(
            tmp_path / "base", {"math": tmp_path / "math"}, tmp_path / "out", MergeRecipe(method)
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_merge_recipe_is_checked():
    with pytest.raises(FeatCalError, match="trim must be one of"):
        MergeRecipe("ties", trim="per-layer")
    with pytest.raises(FeatCalError, match="merge method must be one of"):
        MergeRecipe("dare")
    with pytest.raises(FeatCalError, match="expert 'a': its weight must be a finite"):
        MergeRecipe(weights={"a": float("inf")})


@pytest.mark.parametrize("trim", ["global", "per-tensor"])
def test_checkpoint_ties_with_a_group_of_integers_alone(tmp_path, trim):
    """Groups of one tensor each, one of them an integer buffer: nothing to trim there."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    base = {"a": torch.randn(5, 3, generator=gen), "ids": torch.arange(7), "z": torch.randn(4, generator=gen)}
    experts = {
        t: {
            k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for t in "xy"
    }
    for name, state in [("base", base), *experts.items()]:
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    recipe = MergeRecipe("ties", 1.0, 0.5, trim)
    merge_checkpoints(
        tmp_path / "base", {t: tmp_path / t for t in experts}, tmp_path / "out", recipe, group_bytes=1
    )
    got = LazyCheckpoint(tmp_path / "out")
    want = merge_states(base, experts, recipe)
    assert all(torch.equal(got.read([k])[k], want[k]) for k in base)
    with pytest.raises(FeatCalError, match="no experts"):
        merge_checkpoints(tmp_path / "base", {}, tmp_path / "none", recipe)
