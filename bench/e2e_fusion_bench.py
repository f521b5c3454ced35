"""FusionBench running featcal as its method, end to end, on a small local CLIP vision pool.

The pool is the tests' (tests/test_fusion_bench.py): a CLIP vision base (hidden 32, 2 blocks,
32x32 images), two experts (the base plus random task vectors) and a train dataset of random
images per task, saved locally. The command is `fusion_bench -cd <featcal's config dir>
method=featcal modelpool=tiny_clip taskpool=dummy`, here with 64 calibration images per task.
Printed: the command's seconds and the FeatCal summary FusionBench logged.

    python bench/e2e_fusion_bench.py --markdown bench/results/cpu-fusion-bench.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_fusion_bench import OFFLINE, build_pool, fusion_bench_command  # noqa: E402


def run(work: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    pool = build_pool(work / "pool", examples=args.samples)
    overrides = [f"method.samples_per_task={args.samples}", "method.progress=false"]
    overrides.append(f"merged_model_save_path={work / 'calibrated'}")
    command = fusion_bench_command(pool, work, *overrides)
    env = os.environ | OFFLINE | {"FUSION_BENCH_PROJECT_ROOT": str(work)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"fusion_bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    log = "".join(p.read_text() for p in work.glob("outputs/*/*/*.log"))
    summary = log[log.index("FeatCal calibrated") :].split("\n[")[0].strip().splitlines()
    shown = " ".join(command[1:]).replace(str(work), "<tmp>").replace(command[2], "<featcal's config dir>")
    lines = [
        "# FusionBench with featcal as its method (CPU)",
        "",
        "Command: `python bench/e2e_fusion_bench.py --markdown bench/results/cpu-fusion-bench.md`; the "
        "setup is in its docstring.",
        "",
        f"`fusion_bench {shown}`: exit 0 in {seconds:.1f} s (start-up of hydra and lightning included).",
        "",
        "FusionBench's log:",
        "",
        "```",
        *(line.split("] ", 1)[-1] for line in summary),
        "```",
        "",
    ]
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="featcal-fusion-bench-") as work:
        run(Path(work))


if __name__ == "__main__":
    main()
