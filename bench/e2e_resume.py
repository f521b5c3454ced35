"""The cost of resuming: a 12-block streamed Llama, uninterrupted and killed at block 8 then resumed.

The model is bench/e2e_llama_streamed.py's (hidden 1024, MLP 2816, random weights, sharded
safetensors checkpoints) with 12 blocks and 2 experts. Each run is a fresh process
(`featcal calibrate`'s Python API):

- whole: an uninterrupted run (after a warm-up run of the same);
- killed: the same run, which sends itself SIGKILL once block 7 is recorded in the partial
  output (8 blocks finished);
- resumed: `resume=True` on that partial output: the streams rebuilt at block 8, then blocks 8-11.

Both with stream snapshots (the default: the resumed run reads the streams after the latest
snapshot and replays the blocks after it) and without (patched off: it replays blocks 0-7).
Reported: each run's time, the resume's cost (snapshot read plus replay, from the report's
`resumed_from`) against the seconds the whole run spent on blocks 0-7, the seconds the whole
run spent writing snapshots, and whether the resumed output is bit-identical to the whole
run's. Run:

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


def run(root: Path, mode: str, out: Path, sequences: int, batch: int, snapshots: bool) -> dict:
    """One calibration in this process (`mode`: whole, killed, resumed; `snapshots`: whether
    stream snapshots are taken); its time and report."""
    from featcal import FeatCalConfig, calibrate
    from featcal.pipeline.partial_output import PartialOutput
    from featcal.pipeline.stream_snapshot import SnapshotPolicy

    if not snapshots:
        SnapshotPolicy.due = lambda self: False
    if mode == "killed":
        record = PartialOutput.record

        def record_then_die(self, *args):
            record(self, *args)
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
        "snapshot_seconds": report.snapshot_seconds,
    }


def child(root: Path, mode: str, out: Path, sequences: int, batch: int, snapshots: bool) -> dict | None:
    """Run `mode` in a fresh process: its result (None when it was killed)."""
    command = [sys.executable, __file__, "--child", str(root), mode, str(out), str(sequences), str(batch)]
    done = subprocess.run(command + ["snapshots" if snapshots else "none"], capture_output=True, text=True)
    if mode == "killed":
        assert done.returncode == -signal.SIGKILL, done.stderr
        return None
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, mode, out, sequences, batch, snapshots = args.child
        result = run(Path(root), mode, Path(out), int(sequences), int(batch), snapshots == "snapshots")
        print(json.dumps(result))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="featcal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, "num_hidden_layers": BLOCKS}
    if not (work / "merged").is_dir():
        build(work, EXPERTS, config)
    sizes = (args.sequences, args.batch)
    child(work, "whole", work / "warm-up", *sizes, False)  # the first run of a session is slower
    shutil.rmtree(work / "warm-up")
    variants = {}
    for snapshots in (True, False):
        name = "with_snapshots" if snapshots else "without_snapshots"
        whole = child(work, "whole", work / f"whole-{name}", *sizes, snapshots)
        child(work, "killed", work / f"resumed-{name}", *sizes, snapshots)
        resumed = child(work, "resumed", work / f"resumed-{name}", *sizes, snapshots)
        finished_seconds = sum(whole["block_seconds"][:KILLED_AT])
        r = resumed["resumed_from"]
        cost = r["replay_seconds"] + r.get("restore_seconds", 0.0)
        variants[name] = {
            "whole_seconds": whole["seconds"],
            "whole_snapshot_seconds": whole["snapshot_seconds"],
            "resumed_seconds": resumed["seconds"],
            "resumed_from": r,
            "blocks_0_to_7_seconds_in_whole_run": finished_seconds,
            "resume_cost_seconds": cost,
            "resume_cost_over_finished_blocks": cost / finished_seconds,
            "bit_identical": same_weights(work / f"whole-{name}", work / f"resumed-{name}"),
            "whole_block_seconds": whole["block_seconds"],
        }
        for out in ("whole", "resumed"):
            shutil.rmtree(work / f"{out}-{name}")
        print(json.dumps({name: variants[name]}), file=sys.stderr)
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
        "killed_at_block": KILLED_AT,
        **variants,
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
