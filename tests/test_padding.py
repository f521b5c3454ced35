"""Padding tokens weigh 0: adding padded positions to a batch leaves the calibration unchanged."""

import copy

import pytest
import torch
from tiny_models import BERT, ROBERTA, _text_batch, make_experts

from featcal import FeatCalConfig, calibrate


@pytest.mark.parametrize("family", [BERT, ROBERTA], ids=lambda f: f.name)
def test_extra_padding_leaves_result_unchanged(family):
    base = family.build(0).double()
    experts = make_experts(base, 2)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            p.add_(0.3 * sum(dict(e.named_parameters())[name] - p for e in experts.values()))
    tight, padded = {}, {}
    for k, task in enumerate(experts):
        tight[task], padded[task] = [], []
        for b in range(2):
            seed = 100 * k + b
            tight[task].append(_text_batch(torch.Generator().manual_seed(seed), 4))
            padded[task].append(_text_batch(torch.Generator().manual_seed(seed), 4, pad_to=20))
    assert padded["task0"][0]["input_ids"].shape[1] == 20
    assert (padded["task0"][0]["attention_mask"] == 0).sum() > (
        tight["task0"][0]["attention_mask"] == 0
    ).sum()

    cfg = FeatCalConfig(progress=False)
    a, b = copy.deepcopy(merged), copy.deepcopy(merged)
    _, report_a = calibrate(a, base=base, experts=experts, data=tight, config=cfg)
    _, report_b = calibrate(b, base=base, experts=experts, data=padded, config=cfg)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        err = ((pa - pb).norm() / pa.norm()).item()
        assert err < 1e-9, f"{name}: {err:.2e}"
    moved = max(((pa - pm).norm() / pm.norm()).item() for pa, pm in zip(a.parameters(), merged.parameters()))
    assert moved > 1e-4
    for ba, bb in zip(report_a.blocks, report_b.blocks):
        assert ba.drift_calibrated == pytest.approx(bb.drift_calibrated, rel=1e-9)
        assert ba.drift_merged == pytest.approx(bb.drift_merged, rel=1e-9)
