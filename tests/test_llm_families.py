"""Qwen3, Phi-3, Gemma 2/3 and the MoE decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

Each is calibrated in float64 against the independent implementation of docs/algorithm.md
(reference_impl), T5 too; padding must not change the result (streamed runs: in
test_large_models.py, with the other decoders). MoE: unreached experts keep their merged
weights and are reported, block l + 1 is calibrated on the routing of the calibrated block l,
and a streamed run resumes to the uninterrupted output.
"""

import copy
import json

import pytest
import torch
from reference_impl import reference_calibrate
from tiny_models import (
    _DECODER,
    GEMMA,
    GEMMA2,
    GEMMA3,
    GPT2,
    LLAMA,
    MISTRAL,
    MIXTRAL,
    NEW_FAMILIES,
    QWEN2,
    QWEN3,
    T5,
    _decoder_family,
    _seeded,
    relative_error,
    same_checkpoints,
    save_checkpoints,
    setup,
)
from transformers import Qwen2Config, Qwen2ForCausalLM

from featcal import FeatCalConfig, FeatCalError, calibrate
from featcal.io.lazy_checkpoint import LazyCheckpoint

QUIET = FeatCalConfig(progress=False)


def _matches_reference(family, cfg=QUIET, sequential="off", setup_args=None):
    base, experts, merged, data = setup(family, **(setup_args or {}))
    ours, ref = copy.deepcopy(merged), copy.deepcopy(merged)
    _, report = calibrate(ours, base=base, experts=experts, data=data, config=cfg)
    low = reference_calibrate(family, ref, base, experts, data, cfg, sequential=sequential)
    moved = 0.0
    for (name, mine), theirs, before in zip(
        ours.state_dict().items(), ref.state_dict().values(), merged.state_dict().values()
    ):
        assert relative_error(mine, theirs) < 1e-6, name
        moved = max(moved, relative_error(mine, before))
    assert moved > 1e-3
    return report, low, merged, ours


@pytest.mark.parametrize("family", [LLAMA, MISTRAL, QWEN2, GPT2, *NEW_FAMILIES, T5], ids=lambda f: f.name)
def test_family_matches_reference_block_by_block(family):
    report, low, _, _ = _matches_reference(family)
    assert all(b.drift_calibrated < b.drift_merged for b in report.blocks)
    assert not low and not any(b.low_coverage_experts for b in report.blocks)


@pytest.mark.parametrize("family", [GEMMA, GEMMA2, QWEN3, MIXTRAL], ids=lambda f: f.name)
def test_sublayer_steps_match_reference(family):
    """Gemma 2's post-attention norm closes the attention (Gemma 1's opens the MLP, as Llama's
    does); Qwen3's head norms stay inside it; an MoE layer's router and experts are one step."""
    cfg = FeatCalConfig(progress=False, sequential="sublayer")
    report, _, _, _ = _matches_reference(family, cfg, sequential="sublayer")
    assert [len(b.steps) for b in report.blocks] == [2] * len(report.blocks)


def test_qwen2_sliding_window_layers_are_replayed_with_their_own_mask():
    """Layer 0 full attention, layer 1 a window of 3 (once refused, now supported)."""
    family = _decoder_family("qwen2-sliding", Qwen2ForCausalLM, Qwen2Config)
    family.build = _seeded(
        lambda: Qwen2ForCausalLM(
            Qwen2Config(**_DECODER, use_sliding_window=True, sliding_window=3, max_window_layers=1)
        )
    )
    assert family.build(0).config.layer_types == ["full_attention", "sliding_attention"]
    _matches_reference(family)


@pytest.mark.parametrize("family", [GEMMA3], ids=lambda f: f.name)
def test_a_block_replayed_with_block_0s_arguments_would_differ(family):
    """The layer-type tests are not vacuous: the sliding and the full layers' arguments differ."""
    from featcal.models.adapters import find_adapter
    from featcal.models.capture import capture_first_block_inputs

    model = family.build(0).double()
    batch = family.make_batch(torch.Generator().manual_seed(0), 2)
    _, ctx = capture_first_block_inputs(find_adapter(model), model, batch, torch.device("cpu"))
    assert ctx.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    full, sliding = ctx.for_block(1), ctx.for_block(2)
    assert sliding is ctx
    masks = full.kwargs["attention_mask"], ctx.kwargs["attention_mask"]
    assert masks[1] is not None and (masks[0] is None or not torch.equal(*masks))
    assert not torch.equal(full.kwargs["position_embeddings"][0], ctx.kwargs["position_embeddings"][0])


@pytest.mark.parametrize("family", [LLAMA, T5, *NEW_FAMILIES], ids=lambda f: f.name)
def test_extra_right_padding_leaves_result_unchanged(family):
    """Gemma in float32: HF's float64 eager attention turns fully masked rows into NaN."""
    dtype = torch.float32 if family in (GEMMA2, GEMMA3) else torch.float64
    base, experts, merged, _ = setup(family, tasks=2, dtype=dtype)

    def batches(k, **pad):
        return [family.make_batch(torch.Generator().manual_seed(10 * k + b), 4, **pad) for b in range(2)]

    tight = {t: batches(k) for k, t in enumerate(experts)}
    padded = {t: batches(k, pad_to=20) for k, t in enumerate(experts)}
    a, b = copy.deepcopy(merged), copy.deepcopy(merged)
    calibrate(a, base=base, experts=experts, data=tight, config=QUIET)
    calibrate(b, base=base, experts=experts, data=padded, config=QUIET)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-9
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert relative_error(pb, pa) < tolerance, name
    assert max(relative_error(pa, pm) for pa, pm in zip(a.parameters(), merged.parameters())) > 1e-3


def _route_to_two_experts(model) -> None:
    """Router rows [w, -w, 0, 0] with top-1 routing: experts 2 and 3 are never chosen."""
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            gate.weight[1] = -gate.weight[0]
            gate.weight[2:] = 0
            gate.top_k = 1
    model.config.num_experts_per_tok = 1


def test_unreached_experts_keep_their_merged_weights_and_are_reported():
    base, experts, merged, data = setup(MIXTRAL)
    for model in (merged, base, *experts.values()):
        _route_to_two_experts(model)
    ours, ref = copy.deepcopy(merged), copy.deepcopy(merged)
    _, report = calibrate(ours, base=base, experts=experts, data=data, config=QUIET)
    low = reference_calibrate(MIXTRAL, ref, base, experts, data, QUIET)
    for block in report.blocks:
        assert block.low_coverage_experts == {
            f"mlp.experts.{p}[{e}]": 0 for p in ("gate_up_proj", "down_proj") for e in (2, 3)
        }
    assert sorted(low) == sorted(
        (0, layer, f"mlp.experts.{p}[{e}]")
        for layer in range(2)
        for p in ("gate_up_proj", "down_proj")
        for e in (2, 3)
    )
    for after, before, want in zip(ours.model.layers, merged.model.layers, ref.model.layers):
        for p in ("gate_up_proj", "down_proj"):
            mine, given = getattr(after.mlp.experts, p), getattr(before.mlp.experts, p)
            assert torch.equal(mine[2:], given[2:])
            assert relative_error(mine[:2], given[:2]) > 1e-3
            assert relative_error(mine, getattr(want.mlp.experts, p)) < 1e-6
    assert "routed expert maps kept their merged weights" in report.summary()


def test_few_tokens_threshold_counts_tokens_over_tasks():
    base, experts, merged, data = setup(MIXTRAL)
    cfg = FeatCalConfig(progress=False, min_expert_tokens=10**6)
    ours = copy.deepcopy(merged)
    _, report = calibrate(ours, base=base, experts=experts, data=data, config=cfg)
    counts = report.blocks[0].low_coverage_experts
    assert len(counts) == 8 and all(n > 0 for n in counts.values())
    tokens = sum(int(b["attention_mask"].sum()) for batches in data.values() for b in batches)
    # top-2 routing: every token reaches two experts, so gate_up counts add up to twice the tokens
    assert sum(n for name, n in counts.items() if "gate_up" in name) == 2 * tokens
    for after, before in zip(ours.model.layers, merged.model.layers):
        assert torch.equal(after.mlp.experts.gate_up_proj, before.mlp.experts.gate_up_proj)


@pytest.mark.parametrize("family", [MIXTRAL], ids=lambda f: f.name)
def test_later_blocks_see_the_calibrated_routers_routing(family):
    """Calibrating block 0's router changes where its tokens go, and the run still matches the
    reference, which takes block 1's statistics on the calibrated block 0's output (routed by
    its calibrated router): so featcal's block 1 sees that routing too."""
    _, _, merged, ours = _matches_reference(family)
    batch = setup(family)[3]["task0"][0]
    routes = []
    for model in (merged, ours):
        experts = model.model.layers[0].mlp.experts
        handle = experts.register_forward_pre_hook(lambda m, a: routes.append(a[1].sort(-1).values))
        with torch.no_grad():
            model(**batch, use_cache=False)
        handle.remove()
    assert not torch.equal(routes[0], routes[1])


def test_a_streamed_moe_run_stopped_in_block_1_resumes_to_the_uninterrupted_output(tmp_path, monkeypatch):
    """Block 0 comes back from its per-expert shard in the partial output (fused on reading)."""
    import featcal.pipeline.driver as driver

    base, experts, merged, data = setup(MIXTRAL, dtype=torch.float32)
    base_dir, expert_dirs, merged_dir = save_checkpoints(tmp_path, base, experts, merged)
    models = dict(base=base_dir, experts=expert_dirs, data=data, config=QUIET)
    calibrate(merged_dir, **models, out=tmp_path / "whole")
    real, calls = driver.solve, []

    def stop_in_block_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FeatCalError("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "solve", stop_in_block_1)
    with pytest.raises(FeatCalError, match="stopped"):
        calibrate(merged_dir, **models, out=tmp_path / "out")
    monkeypatch.setattr(driver, "solve", real)
    _, report = calibrate(merged_dir, **models, out=tmp_path / "out", resume=True)
    assert report.resumed_from["block"] == 1
    assert same_checkpoints(tmp_path / "out", tmp_path / "whole")
    assert any(".experts.3.w2.weight" in k for k in LazyCheckpoint(tmp_path / "out").keys())


def test_the_cli_reports_the_experts_it_left_merged(tmp_path, capsys):
    from featcal.cli import main
    from featcal.data import save_calibration_file

    base, experts, merged, data = setup(MIXTRAL, tasks=2, dtype=torch.float32)
    base_dir, expert_dirs, merged_dir = save_checkpoints(tmp_path, base, experts, merged)
    files = []
    for task, batches in data.items():
        save_calibration_file(
            tmp_path / f"{task}.safetensors", {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        )
        files.append(f"{task}={tmp_path / task}.safetensors")
    args = ["calibrate", "--base", str(base_dir), "--merged", str(merged_dir), "--quiet"]
    args += ["--experts", *[f"{t}={d}" for t, d in expert_dirs.items()], "--data", *files]
    assert main([*args, "--out", str(tmp_path / "bad"), "--min-expert-tokens", "0"]) == 2
    assert "min_expert_tokens must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    assert main([*args, "--out", str(tmp_path / "out"), "--min-expert-tokens", "1000000"]) == 0
    assert "16 routed expert maps kept their merged weights" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "featcal_report.json").read_text())
    assert [len(b["low_coverage_experts"]) for b in report["blocks"]] == [8, 8]
    saved, given = LazyCheckpoint(tmp_path / "out"), LazyCheckpoint(merged_dir)
    key = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    assert torch.equal(saved.read([key])[key], given.read([key])[key])


def test_a_checkpoint_with_fused_experts_streams_too(tmp_path):
    """transformers 5 can also save experts fused (save_original_format=False): read and written
    as they are."""
    base, experts, merged, data = setup(MIXTRAL, tasks=2, dtype=torch.float32)
    in_memory = copy.deepcopy(merged)
    calibrate(in_memory, base=base, experts=experts, data=data, config=QUIET)
    dirs = {}
    for name, model in (("base", base), ("merged", merged), *experts.items()):
        model.save_pretrained(tmp_path / name, max_shard_size="30KB", save_original_format=False)
        dirs[name] = tmp_path / name
    assert "model.layers.0.mlp.experts.gate_up_proj" in LazyCheckpoint(dirs["merged"]).keys()
    out = tmp_path / "out"
    experts_dirs = {t: dirs[t] for t in experts}
    calibrate(dirs["merged"], base=dirs["base"], experts=experts_dirs, data=data, config=QUIET, out=out)
    written = LazyCheckpoint(out)
    for name, want in in_memory.state_dict().items():
        if name in written.keys():
            assert torch.equal(written.read([name])[name], want), name
    assert "model.layers.1.mlp.experts.down_proj" in written.keys()


def test_an_expert_missing_from_a_per_expert_checkpoint_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    base, experts, merged, data = setup(MIXTRAL, tasks=1, dtype=torch.float32)
    merged.save_pretrained(tmp_path / "merged")
    shard = tmp_path / "merged" / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(FeatCalError, match=r"no tensor 'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        calibrate(
            tmp_path / "merged", base=base, experts=experts, data=data, config=QUIET, out=tmp_path / "o"
        )


def test_the_memory_plan_counts_a_routed_expert_on_its_share_of_the_tokens():
    from featcal.models.modules import calibrated_modules, routed_fraction
    from featcal.pipeline.memory_plan import estimate

    model = MIXTRAL.build(0)
    block = model.model.layers[0]
    assert routed_fraction(block) == 2 / 4
    plan = estimate([block], 0, torch.float32, torch.float32, [(1, 10, 32)], 0, 1, torch.device("cpu"))
    refs = calibrated_modules(block).values()
    dense = sum(r.d_out for r in refs if r.kind == "linear" and not r.routed)
    routed = sum(r.d_out for r in refs if r.routed)
    width = max(r.d_in for r in refs)
    assert plan.activations == 10 * int(2 * (dense + routed / 2) + 4 * width) * 4
