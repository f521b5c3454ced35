"""The cost of resuming: a 12-block streamed Llama, uninterrupted and killed at block 8 then resumed.

The model is bench/e2e_llama_streamed.py's (hidden 1024, MLP 2816, random weights, sharded
safetensors checkpoints) with 12 blocks and 2 experts. Each run is a fresh process
(`featcal calibrate`'s Python API):

- whole: an uninterrupted run (after a warm-up run of the same);
- killed: the same run, which sends itself SIGKILL once block 7 is recorded in the partial
  output (8 blocks finished);
- resumed: `resume=True` on that partial output: a forward-only replay of blocks 0-7 (the
  calibrated block on the student streams, each expert block on its stream), then blocks 8-11.

Reported: each run's time, the replay's seconds (the report's `resumed_from`) against the
seconds the whole run spent on blocks 0-7, and whether the resumed output is bit-identical to
the whole run's. Run:

    python bench/e2e_resume.py --json bench/results/cpu-resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from e2e_llama_streamed import BATCH, CONFIG, SEQUENCES, TOKENS, build, data
from machine import cpu_name

BLOCKS, KILLED_AT, EXPERTS = 12, 8, 2
TASKS = [f"task{t}" for t in range(EXPERTS)]


def run(root: Path, mode: str, out: Path, sequences: int, batch: int) -> dict:
    """One calibration in this process (`mode`: whole, killed, resumed); its time and report."""
    from featcal import FeatCalConfig, calibrate
    from featcal.pipeline.partial_output import PartialOutput

    if mode == "killed":
        record = PartialOutput.record

        def record_then_die(self, report, where):
            record(self, report, where)
            if self.finished == KILLED_AT:
                os.kill(os.getpid(), signal.SIGKILL)

        PartialOutput.record = record_then_die
    started = time.perf_counter()
    _, report = calibrate(
        root / "merged",
        base=root / "base",
        experts={t: root / t for t in TASKS},
        data=data(TASKS, CONFIG["vocab_size"], sequences, TOKENS, batch),
        config=FeatCalConfig(progress=False),
        out=out,
        resume=mode == "resumed",
    )
    return {
        "seconds": time.perf_counter() - started,
        "block_seconds": [b.seconds for b in report.blocks],
        "resumed_from": report.resumed_from,
    }


def child(root: Path, mode: str, out: Path, sequences: int, batch: int) -> tuple[dict | None, float]:
    """Run `mode` in a fresh process: its result (None when it was killed) and wall time."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--child", str(root), mode, str(out), str(sequences), str(batch)]
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if mode == "killed":
        assert done.returncode == -signal.SIGKILL, done.stderr
        return None, wall
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def same_weights(a: Path, b: Path) -> bool:
    from featcal.io.lazy_checkpoint import LazyCheckpoint

    left, right = LazyCheckpoint(a), LazyCheckpoint(b)
    return left.keys() == right.keys() and all(
        torch.equal(left.read([k])[k], right.read([k])[k]) for k in left.keys()
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--sequences", type=int, default=SEQUENCES, help="per task, of 128 tokens")
    parser.add_argument("--batch", type=int, default=BATCH, help="sequences per batch")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, mode, out, sequences, batch = args.child
        print(json.dumps(run(Path(root), mode, Path(out), int(sequences), int(batch))))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="featcal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, "num_hidden_layers": BLOCKS}
    if not (work / "merged").is_dir():
        build(work, EXPERTS, config)
    for name in ("warm-up", "whole", "resumed"):
        shutil.rmtree(work / name, ignore_errors=True)
    sizes = (args.sequences, args.batch)
    child(work, "whole", work / "warm-up", *sizes)  # the first run of a session is slower
    whole, whole_wall = child(work, "whole", work / "whole", *sizes)
    _, killed_wall = child(work, "killed", work / "resumed", *sizes)
    resumed, resumed_wall = child(work, "resumed", work / "resumed", *sizes)
    finished_seconds = sum(whole["block_seconds"][:KILLED_AT])
    replay = resumed["resumed_from"]["replay_seconds"]
    result = {
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": f"python bench/e2e_resume.py --sequences {args.sequences} --batch {args.batch}",
        "config": {
            **config,
            "experts": EXPERTS,
            "sequences_per_task": args.sequences,
            "tokens": TOKENS,
            "batch": args.batch,
            "drift_examples": 4,
        },
        "whole": {"calibrate_seconds": whole["seconds"], "process_seconds": whole_wall},
        "killed_at_block": KILLED_AT,
        "killed": {"process_seconds": killed_wall},
        "resumed": {
            "calibrate_seconds": resumed["seconds"],
            "process_seconds": resumed_wall,
            "resumed_from": resumed["resumed_from"],
        },
        "blocks_0_to_7_seconds_in_whole_run": finished_seconds,
        "replay_seconds": replay,
        "replay_over_finished_blocks": replay / finished_seconds,
        "bit_identical": same_weights(work / "whole", work / "resumed"),
        "whole_block_seconds": whole["block_seconds"],
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
