"""Sequential statistics inside a block (docs/algorithm.md s.12): how a block is cut into steps,
the exactness the steps buy, and the same results streamed, resumed and from the CLI.

Each step's numbers against the float64 reference run step by step are in
test_reference_agreement.py; over several processes in test_distributed.py; with the Triton
kernels in test_triton_backend.py.
"""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import CLIP_VISION, LLAMA, T5, save_checkpoints, setup
from transformers import CLIPVisionModel

from featcal import FeatCalConfig, FeatCalError, calibrate
from featcal.cli import main
from featcal.data import save_calibration_file
from featcal.models.adapters import BERT
from featcal.models.modules import LINEAR, RMSNORM
from featcal.pipeline.plan import BlockPlan, Group

QUIET = dict(progress=False)


def _plan(*names: str) -> BlockPlan:
    """A plan of one group per entry; 'a+b' is a group of two, names ending in 'norm' are norms."""
    groups = []
    for entry in names:
        members = [SimpleNamespace(name=n) for n in entry.split("+")]
        groups.append(Group(RMSNORM if entry.lower().endswith("norm") else LINEAR, members, None))
    return BlockPlan(groups, names[-1].split("+")[-1])


def _steps(plan: BlockPlan, mode: str, post_norm=lambda name: False) -> list[list[str]]:
    return [[n for i in step for n in plan.groups[i].names] for step in plan.steps(mode, post_norm)]


LLAMA_ORDER = ("input_norm", "q+k+v", "o", "post_attention_norm", "gate+up", "down")
GEMMA_ORDER = (
    "input_norm",
    "q+k+v",
    "o",
    "post_attention_norm",
    "pre_feedforward_norm",
    "gate+up",
    "down",
    "post_feedforward_norm",
)
BERT_ORDER = (
    "query+key+value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate",
    "output.dense",
    "output.LayerNorm",
)
T5_DECODER_ORDER = ("l0.norm", "sq+sk+sv", "so", "l1.norm", "cq", "ck+cv", "co", "l2.norm", "wi0+wi1", "wo")


def test_steps_of_pre_norm_post_norm_and_encoder_decoder_blocks():
    llama = _plan(*LLAMA_ORDER)
    assert _steps(llama, "off") == [
        ["input_norm", "q", "k", "v", "o", "post_attention_norm", "gate", "up", "down"]
    ]
    assert _steps(llama, "group") == [[n for n in g.split("+")] for g in LLAMA_ORDER]
    assert _steps(llama, "sublayer") == [
        ["input_norm", "q", "k", "v", "o"],
        ["post_attention_norm", "gate", "up", "down"],
    ]
    # Gemma: a norm after each sub-layer closes it; the pre-feedforward norm opens the MLP
    gemma = _plan(*GEMMA_ORDER)
    post = lambda name: name.startswith("post_")  # noqa: E731
    assert _steps(gemma, "sublayer", post) == [
        ["input_norm", "q", "k", "v", "o", "post_attention_norm"],
        ["pre_feedforward_norm", "gate", "up", "down", "post_feedforward_norm"],
    ]
    # without the adapter's word, a norm after a linear opens a step
    assert _steps(gemma, "sublayer")[1][:2] == ["post_attention_norm", "pre_feedforward_norm"]
    bert = _plan(*BERT_ORDER)
    assert _steps(bert, "sublayer", BERT.post_norm) == [
        ["query", "key", "value", "attention.output.dense", "attention.output.LayerNorm"],
        ["intermediate", "output.dense", "output.LayerNorm"],
    ]
    t5 = _plan(*T5_DECODER_ORDER)
    assert _steps(t5, "sublayer") == [
        ["l0.norm", "sq", "sk", "sv", "so"],
        ["l1.norm", "cq", "ck", "cv", "co"],
        ["l2.norm", "wi0", "wi1", "wo"],
    ]
    assert len(_steps(t5, "group")) == len(T5_DECODER_ORDER)


def test_unknown_mode_is_refused():
    with pytest.raises(FeatCalError, match="sequential='layer' is not one of off, sublayer, group"):
        FeatCalConfig(sequential="layer")


def _one_expert_case():
    """A CLIP whose merged model differs from its one expert in the blocks alone (the same
    embeddings: block 0's inputs are the expert's)."""
    base = CLIP_VISION.build(0).double()
    gen = torch.Generator().manual_seed(3)

    def moved(scale):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for block in CLIP_VISION.blocks(model):
                for p in block.parameters():
                    p.add_(scale * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        return model

    expert, merged = moved(0.2), moved(0.2)
    data = {"t": [CLIP_VISION.make_batch(gen, 4) for _ in range(3)]}
    return (
        base,
        expert,
        merged,
        {k: [{n: v.double() for n, v in b.items()} for b in bs] for k, bs in data.items()},
    )


def test_group_steps_recover_the_expert_exactly_where_one_pass_cannot():
    """One task, alpha 1, no ridge: every module's target is the expert's own output on the
    inputs it will receive. With the groups solved in order each module receives exactly the
    expert's inputs, so the solve returns the expert's parameters; one pass fits every module
    after the first norm to inputs of the uncalibrated merged block, which it then no longer
    receives."""
    base, expert, merged, data = _one_expert_case()
    cfg = dict(progress=False, teacher_interp_alpha=1.0, lambda_ratio=0.0, covariance_eps=0.0)
    results = {}
    for mode in ("off", "group"):
        model = copy.deepcopy(merged)
        _, report = calibrate(
            model, base=base, experts={"t": expert}, data=data, config=FeatCalConfig(**cfg, sequential=mode)
        )
        errors = {}
        for i, (got, want) in enumerate(zip(CLIP_VISION.blocks(model), CLIP_VISION.blocks(expert))):
            for (name, g), w in zip(got.state_dict().items(), want.state_dict().values()):
                errors[f"{i}.{name}"] = ((g - w).norm() / w.norm()).item()
        results[mode] = errors, report
    group, report = results["group"]
    assert max(group.values()) < 1e-8, max(group.items(), key=lambda kv: kv[1])
    assert all(b.drift_calibrated < 1e-8 < b.drift_merged for b in report.blocks)
    one_pass, _ = results["off"]
    for name in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        assert one_pass[f"0.{name}.weight"] > 1e-3, name


@pytest.mark.parametrize(
    "family,mode", [(LLAMA, "group"), (T5, "sublayer")], ids=["llama-group", "t5-sublayer"]
)
def test_streamed_equals_in_memory(family, mode, tmp_path):
    base, experts, merged, data = setup(family, dtype=torch.float32)
    cfg = FeatCalConfig(**QUIET, sequential=mode)
    in_memory = copy.deepcopy(merged)
    _, mem_report = calibrate(in_memory, base=base, experts=experts, data=data, config=cfg)
    base_dir, expert_dirs, merged_dir = save_checkpoints(tmp_path, base, experts, merged)
    out, _ = calibrate(
        merged_dir, base=base_dir, experts=expert_dirs, data=data, config=cfg, out=tmp_path / "out"
    )
    loaded = type(merged).from_pretrained(out)
    for (name, want), got in zip(in_memory.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(want, got), name
    one_pass = copy.deepcopy(merged)
    calibrate(one_pass, base=base, experts=experts, data=data, config=FeatCalConfig(**QUIET))
    assert any(not torch.equal(a, b) for a, b in zip(one_pass.parameters(), in_memory.parameters()))
    report = json.loads((out / "featcal_report.json").read_text())
    assert report["config"]["sequential"] == mode
    assert [len(b["steps"]) for b in report["blocks"]] == [len(b.steps) for b in mem_report.blocks]
    assert all(len(b.steps) >= 2 for b in mem_report.blocks)


def test_cli_sequential_is_recorded_with_the_seconds_of_each_step(tmp_path, capsys):
    base = CLIP_VISION.build(0)
    experts = {"t1": copy.deepcopy(base), "t2": copy.deepcopy(base)}
    gen = torch.Generator().manual_seed(0)
    for expert in experts.values():
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for p, *qs in zip(merged.parameters(), *(e.parameters() for e in experts.values())):
            p.copy_(p + 0.3 * sum(q - p for q in qs))
    for name, model in {"base": base, "merged": merged, **experts}.items():
        model.save_pretrained(tmp_path / name)
    images = {task: torch.randn(8, 3, 32, 32, generator=gen) for task in experts}
    for task, x in images.items():
        save_calibration_file(tmp_path / f"{task}.safetensors", {"pixel_values": x})
    args = ["calibrate", "--base", str(tmp_path / "base"), "--merged", str(tmp_path / "merged"), "--quiet"]
    args += ["--experts", *[f"{t}={tmp_path / t}" for t in experts]]
    args += ["--data", *[f"{t}={tmp_path / t}.safetensors" for t in experts], "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "out"), "--sequential", "sublayer"]) == 0
    assert "sequential statistics by sublayer: 2 steps per block" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "featcal_report.json").read_text())
    assert report["config"]["sequential"] == "sublayer"
    for block in report["blocks"]:
        first, second = block["steps"]
        assert first["modules"][0] == "layer_norm1" and second["modules"][0] == "layer_norm2"
        assert first["seconds"] > 0 and second["seconds"] > 0
        assert sum(s["seconds"] for s in block["steps"]) <= block["seconds"]
    # the same run through the Python API
    data = {t: [{"pixel_values": x[i : i + 4]} for i in (0, 4)] for t, x in images.items()}
    cfg = FeatCalConfig(**QUIET, sequential="sublayer")
    model, _ = calibrate(copy.deepcopy(merged), base=base, experts=experts, data=data, config=cfg)
    ours = CLIPVisionModel.from_pretrained(tmp_path / "out")
    for (name, want), got in zip(model.state_dict().items(), ours.state_dict().values()):
        assert ((got - want).norm() / want.norm()).item() < 1e-5, name
    with pytest.raises(SystemExit) as refused:
        main([*args, "--out", str(tmp_path / "bad"), "--sequential", "layer"])
    assert refused.value.code == 2
    assert not (tmp_path / "bad").exists()
