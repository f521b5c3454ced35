"""`featcal demo` from a cold cache and from a warm one, each in a fresh process.

Cold: an empty FEATCAL_CACHE_DIR, so the run builds the C++ extension and trains the base and
the experts, as a first run on a new machine does. Warm: the same command again. Reported: the
wall time of each command (process start to exit, imports included), the accuracies of both
runs (they must be equal) and the FeatCal gain. Run:

    python bench/e2e_demo.py --json bench/results/cpu-demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name


def run(cache: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
    """Wall seconds of `featcal demo` in a fresh process, and its report."""
    env = {**os.environ, "FEATCAL_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "featcal", "demo", "--out", str(out), "--quiet", *extra]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("demo_args", nargs="*", help="extra arguments for featcal demo (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cold_seconds, cold = run(cache, Path(tmp) / "cold", args.demo_args)
        warm_seconds, warm = run(cache, Path(tmp) / "warm", args.demo_args)

    def accuracies(report: dict) -> dict:
        return {n: {k: r[k] for k in ("expert", "merged", "featcal")} for n, r in report["tasks"].items()}

    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "command": " ".join(["featcal", "demo", *args.demo_args]),
        "cold_seconds": cold_seconds,
        "cold_training_seconds": cold["models"]["seconds"],
        "warm_seconds": warm_seconds,
        "calibration_seconds": warm["calibration_seconds"],
        "same_numbers": accuracies(cold) == accuracies(warm),
        "average": warm["average"],
        "gain_points": warm["gain_points"],
        "gap_recovered": warm["gap_recovered"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
