"""Each supported LLM family on a tiny random model: how far the merged model's logits are
from each expert's, before and after calibration, and what is calibrated per block.

Per family: a base (float32, 2 or 3 blocks), 3 experts (the base plus Gaussian task vectors of
5% of each tensor's std), their Task Arithmetic merge (0.3), 2 batches of 4 sequences per task
(tests/tiny_models.py). The logits drift is mean_t ||L - L_t|| / ||L_t|| over the
non-padding tokens of 4 fresh batches per task, L_t expert t's logits; modules per block count
every calibrated module of block 0 (norms, routers, and each routed expert's two maps).

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    lines = [
        "| family | adapter | modules per block | logits drift merged | calibrated | change |",
        "|---|---|---|---|---|---|",
    ]
    for family in [LLAMA, *NEW_FAMILIES]:
        base, experts, merged, data = setup(family, dtype=torch.float32)
        for model in (base, merged, *experts.values()):
            model.config._experts_implementation = "grouped_mm"
        fresh = make_data(family, list(experts), batches=4, seed=11)
        before = logits_drift(merged, experts, fresh)
        calibrated = copy.deepcopy(merged)
        _, report = calibrate(
            calibrated, base=base, experts=experts, data=data, config=FeatCalConfig(progress=False)
        )
        after = logits_drift(calibrated, experts, fresh)
        low = sum(len(b.low_coverage_experts) for b in report.blocks)
        note = f", {low} maps kept merged (few tokens)" if low else ""
        change = f"{100 * (after - before) / before:+.1f}%"
        cells = [
            family.name,
            find_adapter(merged).name,
            kinds(merged) + note,
            f"{before:.4f}",
            f"{after:.4f}",
        ]
        lines.append("| " + " | ".join([*cells, change]) + " |")
        print(lines[-1], flush=True)
    if args.markdown:
        header = [
            "# Tiny models of each LLM family: logits drift before and after calibration",
            "",
            f"`python bench/e2e_families.py --markdown {args.markdown}` (CPU, torch {torch.__version__}).",
            "",
        ]
        Path(args.markdown).write_text("\n".join(header + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
