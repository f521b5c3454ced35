"""Each supported LLM family on a tiny random model: how far the merged model's logits are
from each expert's, before and after calibration, and what is calibrated per block.

Per family: a base (float32, 2 or 3 blocks, tests/tiny_models.py), experts = the base plus
Gaussian task vectors of 20% of each tensor's std, merged by Task Arithmetic (0.3), calibrated on
8 batches of 8 sequences per task. Two settings: one task (the merge is the expert's task vector
shrunk to 0.3, so there is one target to recover) and three tasks (independent random task
vectors: nothing systematic to recover, so little changes: random tiny models show the mechanism,
not FeatCal's gains on real fine-tunes). The logits drift is mean_t ||L - L_t|| / ||L_t|| over the
non-padding tokens of 4 fresh batches per task, L_t expert t's logits (embeddings, final norm and
head stay merged); modules per block count every calibrated module of block 0 (norms, routers,
and each routed expert's two maps).

    python bench/e2e_families.py --markdown bench/results/cpu-families.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import LLAMA, NEW_FAMILIES, make_data, setup  # noqa: E402

from featcal import FeatCalConfig, calibrate  # noqa: E402
from featcal.models.adapters import find_adapter  # noqa: E402
from featcal.models.modules import LINEAR, calibrated_modules  # noqa: E402


def logits_drift(model, experts: dict, data: dict) -> float:
    drifts = []
    with torch.no_grad():
        for task, expert in experts.items():
            num = den = 0.0
            for batch in data[task]:
                keep = batch["attention_mask"].bool()
                mine, theirs = model(**batch).logits[keep], expert(**batch).logits[keep]
                num += (mine - theirs).square().sum().item()
                den += theirs.square().sum().item()
            drifts.append((num / den) ** 0.5)
    return sum(drifts) / len(drifts)


def kinds(model) -> str:
    adapter = find_adapter(model)
    block = adapter.blocks(adapter.backbone(model))[0]
    refs = calibrated_modules(block, adapter.module_kind).values()
    count = Counter("routed" if r.routed else ("linear" if r.kind == LINEAR else "norm") for r in refs)
    return f"{len(refs)} ({count['linear']} linear, {count['norm']} norms, {count['routed']} routed maps)"


def drifts(family, tasks: int) -> tuple[float, float, int]:
    """(logits drift of the merge, of the calibrated merge, routed maps left merged)."""
    base, experts, merged, _ = setup(family, tasks, dtype=torch.float32, rel=0.2)
    data = make_data(family, list(experts), batches=8, size=8, seed=3)
    fresh = make_data(family, list(experts), batches=4, seed=11)
    calibrated = copy.deepcopy(merged)
    _, report = calibrate(
        calibrated, base=base, experts=experts, data=data, config=FeatCalConfig(progress=False)
    )
    low = sum(len(b.low_coverage_experts) for b in report.blocks)
    return logits_drift(merged, experts, fresh), logits_drift(calibrated, experts, fresh), low


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    columns = ["family", "adapter", "modules per block", "1 task: merged", "calibrated"]
    columns += ["3 tasks: merged", "calibrated"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for family in [LLAMA, *NEW_FAMILIES]:
        model = family.build(0)
        cells = [family.name, find_adapter(model).name, kinds(model)]
        low = 0
        for tasks in (1, 3):
            before, after, left = drifts(family, tasks)
            cells += [f"{before:.4f}", f"{after:.4f} ({100 * (after - before) / before:+.0f}%)"]
            low += left
        if low:
            cells[2] += f"; {low} routed maps kept merged (few tokens)"
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.markdown:
        header = [
            "# Tiny models of each LLM family: logits drift before and after calibration",
            "",
            f"`python bench/e2e_families.py --markdown {args.markdown}`",
            f"(2-core CPU, torch {torch.__version__}).",
            "Settings: see the script's docstring.",
            "",
        ]
        Path(args.markdown).write_text("\n".join(header + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
