"""End-to-end benchmark: sequential statistics against one pass on B32-4x32, side by side.

The case of bench/e2e_clip_b32.py (CLIP ViT-B/32 vision encoder, random init, 4 experts, 32
images per task, float32, FeatCal defaults), calibrated by `featcal.calibrate` with
sequential="off", "sublayer" and "group" in one process, the modes interleaved in each round
after one warm-up run. Reported per mode: the median wall time and its ratio to one pass, the
seconds per step summed over the blocks (the first step includes the groups' discovery and the
merged model's drift), and the mean drift of the last block on the drift examples.

    python bench/e2e_sequential.py --repeat 3 --json bench/results/cpu-sequential.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from e2e_clip_b32 import BATCH, IMAGES, build_case
from machine import cpu_name

import featcal

MODES = ("off", "sublayer", "group")


def run(case, mode: str) -> tuple[float, featcal.CalibrationReport]:
    base, experts, merged, images, _ = case
    data = {
        t: [{"pixel_values": x[i : i + BATCH]} for i in range(0, IMAGES, BATCH)] for t, x in images.items()
    }
    config = featcal.FeatCalConfig(progress=False, sequential=mode)
    model = copy.deepcopy(merged)
    start = time.perf_counter()
    _, report = featcal.calibrate(model, base=base, experts=experts, data=data, config=config)
    return time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the modes; medians reported")
    parser.add_argument("--layers", type=int, default=12, help="blocks (12 for the standard case)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    featcal.extension.load()  # a first use compiles featcal._C; not part of any timed run
    case = build_case(args.layers)
    run(case, "off")  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    reports = {}
    for _ in range(args.repeat):
        for mode in MODES:
            wall, reports[mode] = run(case, mode)
            seconds[mode].append(wall)
            print(f"{mode:>9}: {wall:.1f} s", flush=True)

    once = statistics.median(seconds["off"])
    rows = {}
    for mode in MODES:
        report = reports[mode]
        steps = max(len(b.steps) for b in report.blocks)
        per_step = [sum(b.steps[k].seconds for b in report.blocks if k < len(b.steps)) for k in range(steps)]
        rows[mode] = {
            "median_seconds": statistics.median(seconds[mode]),
            "seconds": seconds[mode],
            "ratio_to_one_pass": statistics.median(seconds[mode]) / once,
            "step_modules": [s.modules for s in report.blocks[0].steps],
            "step_seconds": per_step,
            "last_block_drift": {
                "merged": report.blocks[-1].drift_merged,
                "calibrated": report.blocks[-1].drift_calibrated,
            },
        }
        print(
            f"{mode:>9}: median {rows[mode]['median_seconds']:.1f} s, "
            f"{rows[mode]['ratio_to_one_pass']:.2f}x one pass; "
            f"per step {', '.join(f'{s:.1f}' for s in per_step)} s; last block drift "
            f"{report.blocks[-1].drift_merged:.4f} -> {report.blocks[-1].drift_calibrated:.4f}"
        )
    result = {
        "case": "B32-4x32" if args.layers == 12 else f"B32-4x32 ({args.layers} blocks)",
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "featcal": featcal.__version__,
        "backend": featcal.ops.backend_info(),
        "repeat": args.repeat,
        "modes": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
