"""The report: per-block drift measured independently, timing, memory, JSON."""

import copy
import json

import pytest
import torch
from tiny_models import BERT, CLIP_VISION, setup

from featcal import FeatCalConfig, calibrate


def _block_outputs(family, model, batch):
    outputs = []
    handles = [
        block.register_forward_hook(lambda m, a, out: outputs.append(out if torch.is_tensor(out) else out[0]))
        for block in family.blocks(model)
    ]
    try:
        with torch.no_grad():
            family.backbone(model)(**batch)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _drifts(family, model, experts, data, count):
    """Per block, mean over tasks of ||S - E|| / ||E|| on the first `count` examples of batch 0."""
    per_task = []
    for task, expert in experts.items():
        batch = {k: v[:count] for k, v in data[task][0].items()}
        mask = batch.get("attention_mask")
        rows = []
        for s, e in zip(_block_outputs(family, model, batch), _block_outputs(family, expert, batch)):
            keep = torch.ones(s.shape[:2]) if mask is None else mask.double()
            diff = ((s - e).square().sum(-1) * keep).sum()
            rows.append((diff / (e.square().sum(-1) * keep).sum()).sqrt().item())
        per_task.append(rows)
    return [sum(col) / len(col) for col in zip(*per_task)]


@pytest.mark.parametrize("family", [CLIP_VISION, BERT], ids=lambda f: f.name)
@pytest.mark.parametrize("count", [2, None])
def test_drift_matches_an_independent_measurement(family, count):
    base, experts, merged, data = setup(family)
    before = _drifts(family, merged, experts, data, count)
    model = copy.deepcopy(merged)
    _, report = calibrate(
        model,
        base=base,
        experts=experts,
        data=data,
        config=FeatCalConfig(progress=False, drift_examples=count),
    )
    after = _drifts(family, model, experts, data, count)
    assert [b.drift_merged for b in report.blocks] == pytest.approx(before, rel=1e-9)
    assert [b.drift_calibrated for b in report.blocks] == pytest.approx(after, rel=1e-9)
    assert set(report.blocks[0].drift_merged_per_task) == set(experts)


def test_report_fields_json_and_summary(tmp_path):
    base, experts, merged, data = setup(CLIP_VISION, dtype=torch.float32)
    _, report = calibrate(merged, base=base, experts=experts, data=data, config=FeatCalConfig(progress=False))
    assert report.wall_seconds > 0
    assert report.peak_cpu_rss_bytes > 0 and report.peak_cuda_bytes is None
    assert report.device == "cpu"
    assert report.tasks["task0"] == {
        "batches": 2,
        "tokens": 2 * 4 * 17,
        "padding_tokens": 0,
    }  # images: no padding
    assert all(b.seconds > 0 for b in report.blocks)
    assert report.backend["weighted_gram"]["cpu"] == "torch"
    report.write_json(tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["config"]["lambda_ratio"] == 0.05
    assert [b["drift_calibrated"] for b in loaded["blocks"]] == [b.drift_calibrated for b in report.blocks]
    text = report.summary()
    assert "drift merged" in text and "peak RSS" in text and len(text.splitlines()) == len(report.blocks) + 3
    assert f"3 tasks, {3 * 2 * 4 * 17} tokens (0 padding), 3 blocks on cpu" in text
    assert "streams on device" in text and loaded["memory_plan"]["placement"] == "device"


def test_drift_can_be_switched_off():
    base, experts, merged, data = setup(CLIP_VISION, dtype=torch.float32)
    cfg = FeatCalConfig(progress=False, drift_examples=0)
    _, report = calibrate(merged, base=base, experts=experts, data=data, config=cfg)
    assert all(b.drift_merged is None and b.drift_calibrated is None for b in report.blocks)
