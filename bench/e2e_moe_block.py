"""The statistics pass of one block, dense against mixture-of-experts, per token.

One Llama-3-8B-shaped block (hidden 4096, MLP 14336, 32 heads, 8 KV heads) and one
Mixtral-8x7B-shaped block (the same attention, 8 experts of MLP 14336, top-2 routing), random
weights, one task: the seconds of featcal's accumulate phase (every module's raw sums, the
expert block run alongside), per token and, for the MoE block, per expert token (each token
reaches top_k = 2 experts, so an MoE token does twice the MLP work of a dense one, spread over
8 experts' Grams). `--scale 8` divides every width by 8 (and the experts' MLP too) so the rows
run on a CPU; the GPU suite (bench/gpu/run.py) runs the full shapes.

    python bench/e2e_moe_block.py --scale 8 --json bench/results/cpu-moe-block.json
    python bench/e2e_moe_block.py --device cuda --dtype bfloat16 --json bench/results/h200-moe-block.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from featcal import FeatCalConfig
from featcal.errors import Location
from featcal.models.adapters import find_adapter
from featcal.models.capture import capture_first_block_inputs
from featcal.pipeline.phases import BlockRun, accumulate, discover, new_sums
from featcal.pipeline.state import BlockInputs

WIDTHS = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)


def _models(scale: int) -> dict:
    shape = {k: max(v // scale, 1) for k, v in WIDTHS.items()}
    shape["num_key_value_heads"] = max(shape["num_attention_heads"] // 4, 1)
    common = dict(**shape, num_hidden_layers=1, vocab_size=1000, max_position_embeddings=4096)
    moe = MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)
    return {
        "dense (llama3-8b)": LlamaForCausalLM(LlamaConfig(**common)),
        "moe (mixtral-8x7b)": MixtralForCausalLM(moe),
    }


def measure(
    model, *, tokens: int, batch: int, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict:
    model = model.to(device=device, dtype=dtype).eval()
    expert = copy.deepcopy(model)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.02 * p.std() * torch.randn_like(p))
    adapter = find_adapter(model)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (batch, tokens), generator=gen)} for _ in range(2)]
    with torch.no_grad():
        student = [capture_first_block_inputs(adapter, model, b, device) for b in batches]
        teacher = [capture_first_block_inputs(adapter, expert, b, device) for b in batches]
    inputs = BlockInputs(
        [h for h, _ in student],
        [h for h, _ in teacher],
        [c for _, c in student],
        [c for _, c in teacher],
        [None] * len(batches),
        [None] * len(batches),
    )
    config = FeatCalConfig(progress=False, cross_method="cross")
    run = BlockRun(adapter, 0, 1, Location(), config, torch.float32, device)
    block, expert_block = model.model.layers[0], expert.model.layers[0]
    with torch.no_grad():
        plan, _ = discover(run, block, expert_block, inputs)
        n = sum(h.shape[0] * h.shape[1] for h in inputs.student)
        times = []
        for _ in range(repeats):
            sums = new_sums(run, plan, n)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            accumulate(run, plan, block, expert_block, inputs, sums, None, task="t")
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del sums
    seconds = sorted(times)[len(times) // 2]
    top_k = getattr(model.config, "num_experts_per_tok", 1)
    return {
        "tokens": n,
        "groups": len(plan.groups),
        "seconds": seconds,
        "us_per_token": 1e6 * seconds / n,
        "us_per_expert_token": 1e6 * seconds / (n * top_k),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="divide every width by this")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch (2 batches)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = {}
    for name, model in _models(args.scale).items():
        rows[name] = measure(
            model, tokens=args.tokens, batch=args.batch, device=device, dtype=dtype, repeats=args.repeats
        )
        r = rows[name]
        print(
            f"{name:20s} {r['groups']:3d} groups  {r['seconds']:8.3f} s  {r['us_per_token']:9.2f} us/token  "
            f"{r['us_per_expert_token']:9.2f} us/expert token",
            flush=True,
        )
    dense, moe = rows.values()
    ratio = moe["us_per_token"] / dense["us_per_token"]
    per_expert = moe["us_per_expert_token"] / dense["us_per_token"]
    print(f"moe / dense per token: {ratio:.2f}x  (per expert token: {per_expert:.2f}x)")
    if args.json:
        record = {
            "command": " ".join(sys.argv),
            "device": str(device),
            "dtype": args.dtype,
            "scale": args.scale,
            "rows": rows,
            "moe_over_dense_per_token": ratio,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
