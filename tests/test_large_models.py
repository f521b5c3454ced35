"""Decoder-only LLMs (Llama, Mistral, Qwen2, GPT-2, and the families of test_llm_families.py)
and T5, in memory and streamed from disk (MoE checkpoints in their per-expert layout).

Streamed runs read the base, the experts and the merged model block by block from sharded
safetensors checkpoints and write the calibrated blocks as they go; they must give exactly the
in-memory result, wherever the hidden-state streams live.
"""

import copy
import json

import pytest
import torch
from tiny_models import (
    LARGE_FAMILIES,
    LLAMA,
    NEW_FAMILIES,
    T5,
    relative_error,
    save_checkpoints,
    setup,
)

from featcal import FeatCalConfig, FeatCalError, calibrate
from featcal.io.lazy_checkpoint import LazyCheckpoint

QUIET = FeatCalConfig(progress=False)


def _stages(family, model):
    if family is T5:
        return [model.encoder.block, model.decoder.block]
    return [family.blocks(model)]


@pytest.mark.parametrize("placement", ["device", "cpu", "disk"])
@pytest.mark.parametrize("family", [*LARGE_FAMILIES, *NEW_FAMILIES], ids=lambda f: f.name)
def test_streamed_from_disk_equals_in_memory(family, placement, tmp_path):
    base, experts, merged, data = setup(family, dtype=torch.float32)
    in_memory = copy.deepcopy(merged)
    _, mem_report = calibrate(in_memory, base=base, experts=experts, data=data, config=QUIET)

    base_dir, expert_dirs, merged_dir = save_checkpoints(tmp_path, base, experts, merged)
    assert len(list(merged_dir.glob("model-*.safetensors"))) > 1
    out = tmp_path / "out"
    cfg = FeatCalConfig(progress=False, stream_placement=placement, offload_dir=str(tmp_path / "offload"))
    result, report = calibrate(merged_dir, base=base_dir, experts=expert_dirs, data=data, config=cfg, out=out)

    assert result == out and report.memory_plan["placement"] == placement
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > sum(len(b) for b in _stages(family, merged))
    assert (out / "config.json").is_file() and (out / "featcal_report.json").is_file()
    assert not list((tmp_path / "offload").glob("*"))  # disk streams are removed
    loaded = type(merged).from_pretrained(out)
    for (name, want), got in zip(in_memory.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(want, got), name
    for a, b in zip(mem_report.blocks, report.blocks):
        assert a.drift_calibrated == b.drift_calibrated and a.stage == b.stage


def test_reads_one_block_at_a_time(tmp_path, monkeypatch):
    """No read ever spans more than one block of one model, or its front (embeddings)."""
    base, experts, merged, data = setup(LLAMA, tasks=3, dtype=torch.float32)
    base_dir, expert_dirs, merged_dir = save_checkpoints(tmp_path, base, experts, merged)
    reads = []
    original = LazyCheckpoint.read

    def recording(self, keys, *args, **kwargs):
        keys = list(keys)
        reads.append((self.path.name, keys))
        return original(self, keys, *args, **kwargs)

    monkeypatch.setattr(LazyCheckpoint, "read", recording)
    calibrate(merged_dir, base=base_dir, experts=expert_dirs, data=data, config=QUIET, out=tmp_path / "out")
    total = len(merged.state_dict())
    for model, keys in reads:
        layers = {k.split(".")[2] for k in keys if k.startswith("model.layers.")}
        assert len(layers) <= 1, (model, keys)
        assert len(keys) < total / 2, (model, keys)
    for task in experts:
        assert any(m == task and any(".layers.1." in k for k in keys) for m, keys in reads)


def test_budget_too_small_is_refused_before_any_work(tmp_path, monkeypatch):
    base, experts, merged, data = setup(LLAMA, dtype=torch.float32)
    base_dir, expert_dirs, merged_dir = save_checkpoints(tmp_path, base, experts, merged)

    def no_block(*args, **kwargs):
        raise AssertionError("a block was read before the budget was checked")

    monkeypatch.setattr("featcal.models.lazy_model.LazyModel.block", no_block)
    cfg = FeatCalConfig(progress=False, max_cpu_memory="20KB")
    with pytest.raises(
        FeatCalError, match=r"does not fit the memory budget \(19\.5 KiB of memory.*\n.*memory plan"
    ):
        calibrate(merged_dir, base=base_dir, experts=expert_dirs, data=data, config=cfg, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_auto_placement_moves_streams_to_disk_under_a_budget(tmp_path):
    base, experts, merged, data = setup(LLAMA, dtype=torch.float32)
    want = copy.deepcopy(merged)
    calibrate(want, base=base, experts=experts, data=data, config=QUIET)
    probe = copy.deepcopy(merged)
    plan = calibrate(probe, base=base, experts=experts, data=data, config=QUIET).report.memory_plan
    budget = plan["weights"] + plan["statistics"] + plan["activations"] + 2 * plan["batch"]
    assert budget < plan["weights"] + plan["statistics"] + plan["activations"] + plan["streams"]
    got = copy.deepcopy(merged)
    cfg = FeatCalConfig(progress=False, max_cpu_memory=budget)
    _, report = calibrate(got, base=base, experts=experts, data=data, config=cfg)
    assert report.memory_plan["placement"] == "disk"
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)


def _decoder_output(model, batch):
    """The last decoder block's output (before the final norm), from the model's own forward."""
    seen = {}
    handle = model.decoder.final_layer_norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen["x"]


def test_t5_encoder_and_decoder_both_change_and_replay_matches_the_model():
    base, experts, merged, data = setup(T5)
    calibrated = copy.deepcopy(merged)
    _, report = calibrate(calibrated, base=base, experts=experts, data=data, config=QUIET)
    assert [b.stage for b in report.blocks] == ["t5", "t5", "t5-decoder", "t5-decoder"]
    for stack in ("encoder", "decoder"):
        for i, (after, before) in enumerate(
            zip(getattr(calibrated, stack).block, getattr(merged, stack).block)
        ):
            moved = max(relative_error(a, b) for a, b in zip(after.parameters(), before.parameters()))
            assert moved > 1e-3, f"{stack} block {i} did not change"
    # The drift that the streams measure at the last block is the models' own: the merged
    # model's and each expert's decoder outputs on the drift examples, padding excluded.
    last = report.blocks[-1]
    for task, expert in experts.items():
        batch = {k: v[:4] for k, v in data[task][0].items()}
        s, e = _decoder_output(merged, batch), _decoder_output(expert, batch)
        keep = batch["decoder_attention_mask"].bool()
        want = ((s - e)[keep].norm() / e[keep].norm()).item()
        assert last.drift_merged_per_task[task] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_checkpoints_calibrate_like_float32(dtype, tmp_path):
    """Statistics and solves run in float32: a half-precision run lands where the float32 run
    does, up to the rounding of its weights and activations, far from the uncalibrated merge."""
    base, experts, merged, data = setup(LLAMA, dtype=torch.float32)
    want = copy.deepcopy(merged)
    calibrate(want, base=base, experts=experts, data=data, config=QUIET)
    half = [m.to(dtype) for m in (base, merged, *experts.values())]
    base_dir, expert_dirs, merged_dir = save_checkpoints(
        tmp_path, half[0], dict(zip(experts, half[2:])), half[1]
    )
    out = tmp_path / "out"
    calibrate(merged_dir, base=base_dir, experts=expert_dirs, data=data, config=QUIET, out=out)
    got = LazyCheckpoint(out)
    checked = 0
    for name, value in want.state_dict().items():
        assert got.dtype(name) == dtype
        (read,) = got.read([name]).values()
        moved = relative_error(merged.state_dict()[name], value)
        if moved > 1e-2:
            assert relative_error(read, value) < moved / 4, name
            checked += 1
    assert checked > 10


def test_merged_path_needs_out(tmp_path):
    base, experts, merged, data = setup(LLAMA, dtype=torch.float32)
    _, expert_dirs, merged_dir = save_checkpoints(tmp_path, base, experts, merged)
    with pytest.raises(FeatCalError, match="give out="):
        calibrate(merged_dir, base=base, experts=expert_dirs, data=data, config=QUIET)


def test_missing_tensor_in_an_expert_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    base, experts, merged, data = setup(LLAMA, tasks=2, dtype=torch.float32)
    expert = experts["task1"]
    state = {k: v for k, v in expert.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    expert.config.save_pretrained(tmp_path / "task1")
    save_file(state, tmp_path / "task1" / "model.safetensors", metadata={"format": "pt"})
    experts["task1"] = tmp_path / "task1"
    with pytest.raises(
        FeatCalError, match=r"expert 'task1'.*no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=QUIET)


def test_an_in_memory_front_moves_only_what_runs_before_the_first_block():
    """front() of an in-memory model puts the backbone outside the blocks on the device (here
    "meta", which any machine has) and leaves the blocks, then puts every tensor back."""
    from featcal.models.sources import ModelSource

    model = LLAMA.build(0)
    before = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    source = ModelSource(model, "merged")
    with source.front(0, torch.device("meta")):
        inside = model.state_dict(keep_vars=True)
        moved = {name for name, t in inside.items() if t.device.type == "meta"}
        assert moved and all(".layers." not in name for name in moved)
        assert "model.embed_tokens.weight" in moved and "model.norm.weight" in moved
        assert all(inside[name] is before[name] for name in inside if ".layers." in name)
    assert all(t is before[name] for name, t in model.state_dict(keep_vars=True).items())
