"""End-to-end benchmark: B32-4x32 on 2 processes of 1 thread each against 1 process of 1 thread.

The case is `e2e_clip_b32.py`'s (CLIP ViT-B/32 vision encoder, 12 blocks, 4 experts, 32 images
per task, float32, FeatCal defaults). Each run is its own process (or pair of processes on a
gloo group, started by torch.multiprocessing with a file rendezvous), builds the case from the
same seeds, and times `featcal.calibrate` alone; the parent compares the calibrated weights.
Runs alternate (single, pair, single, pair, ...) so that both see the same machine, after an
unrecorded warm-up run (here the first run after a pause was 1.45x slower than the next ones).

    python bench/e2e_distributed.py --repeat 3 --json bench/results/distributed-b32-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from e2e_clip_b32 import build_case
from machine import cpu_name
from safetensors.torch import load_file, save_file


def _calibrate(rank: int, world: int, out: str, layers: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        rendezvous = f"file://{out}.rendezvous"
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))  # fmt: skip
    import featcal

    base, experts, merged, images, _ = build_case(layers)
    data = {t: list(x.split(16)) for t, x in images.items()}
    config = featcal.FeatCalConfig(progress=False, distributed="on" if world > 1 else "off")
    started = time.perf_counter()
    _, report = featcal.calibrate(merged, base=base, experts=experts, data=data, config=config)
    seconds = time.perf_counter() - started
    mine = None if report.distributed is None else report.distributed.ranks[rank]
    comm = None if mine is None else mine["communication_seconds"]
    phases = None if mine is None else mine["communication_seconds_by_phase"]
    if rank == 0:
        save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out + ".safetensors")
    Path(f"{out}.rank{rank}.json").write_text(
        json.dumps(
            {
                "seconds": seconds,
                "communication_seconds": comm,
                "by_phase": phases,
                "peak_rss": report.peak_cpu_rss_bytes,
            }
        )
    )
    if world > 1:
        dist.destroy_process_group()


def run(world: int, out: str, layers: int) -> list[dict]:
    context = mp.get_context("spawn")
    procs = [context.Process(target=_calibrate, args=(r, world, out, layers)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a process of the {world}-process run failed ({p.exitcode})")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run(1, f"{tmp}/warmup", 2)  # the first run on a cold machine is slower, whichever it is
        for i in range(args.repeat):
            single = run(1, f"{tmp}/single{i}", args.layers)
            pair = run(2, f"{tmp}/pair{i}", args.layers)
            a, b = load_file(f"{tmp}/single{i}.safetensors"), load_file(f"{tmp}/pair{i}.safetensors")
            diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
            scale = max(a[k].double().abs().max().item() for k in a)
            wall = max(r["seconds"] for r in pair)
            row = {
                "single_seconds": single[0]["seconds"],
                "two_process_seconds": wall,
                "speedup": single[0]["seconds"] / wall,
                "communication_share": [r["communication_seconds"] / r["seconds"] for r in pair],
                "communication_seconds_by_phase": [r["by_phase"] for r in pair],
                "max_abs_weight_difference": diff,
                "max_abs_weight": scale,
                "peak_rss_gib": {
                    "single": single[0]["peak_rss"] / 2**30,
                    "per_rank": [r["peak_rss"] / 2**30 for r in pair],
                },
            }
            rows.append(row)
            print(json.dumps(row))
    speedups = sorted(r["speedup"] for r in rows)
    result = {
        "case": f"B32-4x32 ({args.layers} blocks), float32, 1 thread per process, gloo",
        "machine": cpu_name(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "runs": rows,
        "median_speedup": speedups[len(speedups) // 2],
    }
    print(f"median speed-up of 2 processes over 1: {result['median_speedup']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
