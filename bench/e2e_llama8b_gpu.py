"""Streamed calibration at Llama-3-8B block sizes on one GPU: peak GPU memory and time per block.

8 blocks of hidden 4096, MLP 14336, 32 heads, 8 KV heads (vocab 32000 to keep the checkpoints
small), bfloat16, random weights; the base, 4 experts (base plus random task vectors) and their
Task Arithmetic merge are sharded safetensors checkpoints on disk. 128 sequences of 2048 tokens
per task, batches of 4, under `--max-gpu-memory 12GiB`: the plan puts the hidden-state streams
in pinned CPU memory. `--blocks`, `--experts` and `--sequences` shrink it (bench/gpu/run.py
takes 2, 2 and 32). Run on a GPU machine:

    python bench/e2e_llama8b_gpu.py --workdir /tmp/llama8b --json bench/results/h100-llama8b-streamed.json

`--tiny` runs the same pipeline at toy sizes (on the CPU when there is no GPU) to check it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from e2e_llama_streamed import CONFIG, build, data

FULL = {
    **CONFIG,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
TINY = {
    **FULL,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--max-gpu-memory", default="12GiB")
    parser.add_argument("--blocks", type=int, default=FULL["num_hidden_layers"], help="decoder blocks")
    parser.add_argument("--sequences", type=int, default=128, help="sequences of 2048 tokens per task")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to check the script")
    args = parser.parse_args()

    from featcal import FeatCalConfig, calibrate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = {**(TINY if args.tiny else FULL), "num_hidden_layers": args.blocks}
    sequences, tokens, batch = (8, 64, 4) if args.tiny else (args.sequences, 2048, 4)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="featcal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (work / "merged").is_dir():
        build(work, args.experts, config, dtype=torch.bfloat16, device=device)
    print(f"checkpoints in {work} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    tasks = [f"task{t}" for t in range(args.experts)]
    cfg = FeatCalConfig(max_gpu_memory=args.max_gpu_memory if device.type == "cuda" else None)
    out = work / "out"
    result, report = calibrate(
        work / "merged",
        base=work / "base",
        experts={t: work / t for t in tasks},
        data=data(tasks, config["vocab_size"], sequences, tokens, batch),
        config=cfg,
        device=device,
        out=out,
        overwrite=True,
    )
    rows = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": " ".join(["python", *sys.argv]),
        "config": {
            **config,
            "dtype": "bfloat16",
            "experts": args.experts,
            "sequences_per_task": sequences,
            "tokens": tokens,
            "batch": batch,
        },
        "memory_plan": report.memory_plan,
        "peak_gpu_bytes": report.peak_cuda_bytes,
        "peak_cpu_rss_bytes": report.peak_cpu_rss_bytes,
        "wall_seconds": report.wall_seconds,
        "seconds_per_block": [b.seconds for b in report.blocks],
        "drift": [[b.drift_merged, b.drift_calibrated] for b in report.blocks],
        "backend": report.backend,
    }
    text = json.dumps(rows, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
