"""Peak memory of streamed calibration against the number of experts (CPU).

A Llama with 8 blocks, hidden 1024, MLP 2816 (16 heads, 4 KV heads, vocab 2048, float32:
0.38 GB a model) and random weights; experts are the base plus random task vectors, merged by
Task Arithmetic; every model is a sharded safetensors checkpoint on disk. For 2, 4 and 6
experts, each run is a fresh process:

- streamed: `calibrate(merged_dir, base=base_dir, experts={t: dir}, out=...)`, which reads one
  block of one model at a time and writes each calibrated block as it is done;
- in memory: every model loaded with from_pretrained, then `calibrate(module, ...)`.

Reported: wall time and peak RSS of each run, and the largest relative difference between the
streamed and the in-memory calibrated tensors. Run:

    python bench/e2e_llama_streamed.py --experts 2,4,6 --json bench/results/cpu-llama-streamed.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name

CONFIG = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=2048,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
SEQUENCES, TOKENS, BATCH = 8, 128, 4


def build(
    root: Path,
    experts: int,
    config: dict,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> None:
    """base/, task0..task{n-1}/ and merged/ (TA, scaling 0.3) as sharded checkpoints: the base
    random, each expert the base plus a task vector of 5% of each tensor's std."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
    model.save_pretrained(root / "base", max_shard_size="1GB")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    merged = {k: v.float() for k, v in weights.items()}
    gen = torch.Generator(device).manual_seed(1)
    for t in range(experts):
        expert = {}
        for key, value in weights.items():
            noise = torch.randn(value.shape, generator=gen, device=value.device, dtype=value.dtype)
            expert[key] = value + 0.05 * value.float().std().to(value.dtype) * noise
            merged[key] += 0.3 * (expert[key].float() - value.float())
        model.load_state_dict(expert)
        model.save_pretrained(root / f"task{t}", max_shard_size="1GB")
        del expert
    model.load_state_dict({k: v.to(dtype) for k, v in merged.items()})
    model.save_pretrained(root / "merged", max_shard_size="1GB")


def data(tasks: list[str], vocab: int, sequences: int, tokens: int, batch: int) -> dict:
    """Random token ids, the same for every run: per task `sequences` of `tokens` in batches."""
    gen = torch.Generator().manual_seed(2)
    out = {}
    for task in tasks:
        ids = torch.randint(0, vocab, (sequences, tokens), generator=gen)
        out[task] = [
            {"input_ids": ids[i : i + batch], "attention_mask": torch.ones_like(ids[i : i + batch])}
            for i in range(0, sequences, batch)
        ]
    return out


def run(root: Path, experts: int, mode: str, out: Path) -> dict:
    """One calibration in this process; returns its time and peak RSS."""
    from featcal import FeatCalConfig, calibrate
    from featcal.pipeline.report import peak_cpu_rss_bytes

    tasks = [f"task{t}" for t in range(experts)]
    cfg = FeatCalConfig(progress=False)
    inputs = data(tasks, CONFIG["vocab_size"], SEQUENCES, TOKENS, BATCH)
    started = time.perf_counter()
    if mode == "streamed":
        calibrate(
            root / "merged",
            base=root / "base",
            experts={t: root / t for t in tasks},
            data=inputs,
            config=cfg,
            out=out,
        )
    else:
        from transformers import LlamaForCausalLM

        load = lambda name: LlamaForCausalLM.from_pretrained(root / name).eval()  # noqa: E731
        merged = load("merged")
        calibrate(
            merged,
            base=load("base"),
            experts={t: load(t) for t in tasks},
            data=inputs,
            config=cfg,
            out=out,
        )
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_bytes": peak_cpu_rss_bytes()}


def largest_difference(a: Path, b: Path) -> float:
    from featcal.io.lazy_checkpoint import LazyCheckpoint

    left, right = LazyCheckpoint(a), LazyCheckpoint(b)
    worst = 0.0
    for key in left.keys():
        (x,) = left.read([key]).values()
        (y,) = right.read([key]).values()
        worst = max(worst, ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", default="2,4,6")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "EXPERTS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, experts, mode = Path(args.child[0]), int(args.child[1]), args.child[2]
        print(json.dumps(run(root, experts, mode, root / f"out-{mode}-{experts}")))
        return

    counts = [int(n) for n in args.experts.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="featcal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build(work, max(counts), CONFIG)
    print(f"checkpoints written to {work} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    model_bytes = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
    rows = []
    for n in counts:
        row = {"experts": n}
        for mode in ("streamed", "in_memory"):
            child = [sys.executable, __file__, "--child", str(work), str(n), mode]
            done = subprocess.run(child, check=True, capture_output=True, text=True)
            row[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        row["max_relative_difference"] = largest_difference(
            work / f"out-streamed-{n}", work / f"out-in_memory-{n}"
        )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    streamed = [r["streamed"]["peak_rss_bytes"] for r in rows]
    result = {
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python bench/e2e_llama_streamed.py --experts " + args.experts,
        "config": {**CONFIG, "sequences_per_task": SEQUENCES, "tokens": TOKENS, "batch": BATCH},
        "model_bytes": model_bytes,
        "rows": rows,
        "streamed_rss_growth_bytes": max(streamed) - min(streamed),
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
