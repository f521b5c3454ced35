"""On paper: a distributed FeatCal run of Llama-3-70B with 8 experts, from featcal's own plan code.

Builds one Llama-3-70B decoder block on the meta device (no memory, no download), forms its
module groups as discovery finds them ([input norm] [q k v] [o] [post-attention norm] [gate up]
[down]), and asks featcal what each process holds and sends: `split_work` (who does what),
`TaskSums.zeros` and `BlockSystem.zeros` (the sums and systems, with the right-hand-side method
each group would pick), `solve_owners` (who solves what) and the memory plan's `estimate`. The
times come from published peak rates and bandwidths at the stated efficiencies, not from a
measurement:

    python bench/distributed_plan.py > bench/results/distributed-llama70b-plan.md
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from featcal.memory_plan import estimate, human
from featcal.models.modules import calibrated_modules
from featcal.pipeline.plan import BlockPlan, Group
from featcal.pipeline.solver import BlockSystem
from featcal.pipeline.statistics import TaskSums
from featcal.pipeline.work import solve_cost, solve_owners, split_work

LAYERS, EXPERTS, EXAMPLES, LENGTH, BATCH = 80, 8, 128, 2048, 8
GROUPS = [["input_layernorm"], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
          ["self_attn.o_proj"], ["post_attention_layernorm"], ["mlp.gate_proj", "mlp.up_proj"],
          ["mlp.down_proj"]]  # fmt: skip

# Published dense peaks and the fractions assumed reachable (statistics and forwards in bf16 with
# fp32 accumulation; solves in fp32), and collective bandwidths (NCCL bus bandwidth).
H100 = {"bf16": 989e12, "fp32": 67e12, "matmul efficiency": 0.5, "solve efficiency": 0.5}
LINKS = {
    "NVLink 4 within a node (NCCL bus bandwidth)": 350e9,
    "InfiniBand NDR between 2 nodes (8 x 400 Gb/s per node, NCCL bus bandwidth)": 90e9,
}


def block() -> tuple[torch.nn.Module, BlockPlan]:
    config = LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
        num_hidden_layers=LAYERS, vocab_size=128256,
    )  # fmt: skip
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16)
    refs = calibrated_modules(layer)
    groups = [Group(refs[names[0]].kind, [refs[n] for n in names], None) for names in GROUPS]
    return layer, BlockPlan(groups, "mlp.down_proj")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    layer, plan = block()
    tokens_per_task = EXAMPLES * LENGTH
    params = sum(p.numel() for p in layer.parameters())
    forward_flops = 2 * params * tokens_per_task
    print("# Llama-3-70B, 8 experts, 128 x 2048 tokens per task: the distributed plan on paper\n")
    print("Written by `python bench/distributed_plan.py` from featcal's own work split, sums, systems,")
    print("solve owners and memory estimate, over a Llama-3-70B block on the meta device. With 16")
    print("processes the two ranks of a split task are neighbours (2t, 2t+1), in one node.")
    print("Times are estimates from published peak rates and bandwidths, not measurements.\n")
    print(f"One block: {params / 1e6:.0f} M parameters, {human(params * 2)} in bf16; 80 blocks.")
    print(f"Per task: {EXAMPLES} examples of {LENGTH} tokens ({tokens_per_task}), batches of {BATCH}.\n")
    for nodes in (1, 2):
        world = 8 * nodes
        work = split_work({f"task{t}": [BATCH * LENGTH] * (EXAMPLES // BATCH) for t in range(EXPERTS)}, world)
        mine = work.batches[0]
        local_tokens = sum(len(v) for v in mine.values()) * BATCH * LENGTH
        sums = TaskSums.zeros(plan, tokens=tokens_per_task, alpha=0.25, cross_method="auto",
                              dtype=torch.float32, device=torch.device("meta"))  # fmt: skip
        system = BlockSystem.zeros(plan, torch.float32, torch.device("meta"))
        owners = solve_owners(plan, world)
        methods = [type(s).__name__.replace("Sums", "").lower() for s in sums.groups]
        batches = [(BATCH, LENGTH, 8192)] * (local_tokens // (BATCH * LENGTH))
        memory = estimate([layer], params * 2, torch.bfloat16, torch.float32, batches, 0, len(mine), "cuda")
        shared = [t for t in work.tokens if len(work.ranks_of(t)) > 1]
        print(f"## {nodes} node{'s' * (nodes > 1)} x 8 GPUs ({world} processes)\n")
        if shared:
            held = {t: len(b) for t, b in mine.items()}
            print(f"- Work: rank 0 holds {held} (task: batches); {len(shared)} tasks are split in two.")
        else:
            print(f"- Work: each rank holds one whole task ({len(mine['task0'])} batches); none is shared.")
        print(f"- Right-hand-side method per group: {dict(zip([g.names[0] for g in plan.groups], methods))}.")
        print(
            f"- Owners of the solves (greedy by cost): {dict(zip([g.names[0] for g in plan.groups], owners))}"
        )
        print("\n| per process | bytes |\n|---|---:|")
        stream = local_tokens * 8192 * 2
        rows = [
            ("merged + expert + base block (bf16)", 3 * params * 2),
            ("one task's raw sums (fp32, all groups)", nbytes(sums.tensors())),
            ("the block's folded system (fp32)", nbytes(system.tensors())),
            ("student + expert streams + one being rebuilt (bf16)", 3 * stream),
            ("one batch's activations (featcal's estimate)", memory.activations),
        ]
        for name, size in rows:
            print(f"| {name} | {human(size)} |")
        print(f"| **total** | **{human(sum(s for _, s in rows))}** of 80 GiB |\n")
        reduce_sums = sum(nbytes(sums.tensors()) for _ in shared) / max(len(shared), 1) if shared else 0
        reduce_systems = nbytes(t for group in system.groups for t in group.collective_tensors())
        broadcast = params * 2
        print("| collective per block | bytes | time |\n|---|---:|---:|")
        link = list(LINKS.values())[0] if nodes == 1 else list(LINKS.values())[1]
        if shared:
            pair = list(LINKS.values())[0]  # the ranks of a split task are neighbours, in one node
            print(f"| all-reduce of a split task's raw sums (2 ranks, one node) | {human(int(reduce_sums))} "
                  f"| {reduce_sums / pair * 1e3:.0f} ms |")  # fmt: skip
        print(
            f"| reduce of the systems to their owners (A's lower triangle) | {human(reduce_systems)} "
            f"| {reduce_systems / link * 1e3:.0f} ms |"
        )
        print(
            f"| broadcast of the solved parameters (bf16) | {human(broadcast)} "
            f"| {broadcast / link * 1e3:.0f} ms |"
        )
        print("| status checks (a few hundred bytes each, 5 per block) | - | < 1 ms |\n")
        stats = sum(_statistics_flops(g, m, local_tokens) for g, m in zip(plan.groups, methods))
        forwards = 3 * forward_flops * local_tokens / tokens_per_task  # expert, merged, propagate
        compute = (stats + forwards) / (H100["bf16"] * H100["matmul efficiency"])
        largest = max(solve_cost(g) for g in plan.groups)
        solve = largest / (H100["fp32"] * H100["solve efficiency"])
        comm = (reduce_systems + broadcast) / link + (reduce_sums / list(LINKS.values())[0] if shared else 0)
        block_seconds = compute + solve + comm
        print(f"Per block on H100s: forwards {forwards:.2e} and statistics {stats:.2e} flops per process, "
              f"{compute:.2f} s at {H100['matmul efficiency']:.0%} of the bf16 peak; the largest solve "
              f"(`mlp.down_proj`, {largest:.2e} flops) {solve:.2f} s at {H100['solve efficiency']:.0%} of "
              f"the fp32 peak; collectives {comm * 1e3:.0f} ms. **About {block_seconds:.1f} s per block, "
              f"{block_seconds * LAYERS / 60:.0f} minutes for the 80 blocks.**\n")  # fmt: skip
    one = 8 * (3 * forward_flops) + 8 * sum(
        _statistics_flops(g, m, tokens_per_task) for g, m in zip(plan.groups, methods)
    )
    one_gpu = one / (H100["bf16"] * H100["matmul efficiency"]) + sum(solve_cost(g) for g in plan.groups) / (
        H100["fp32"] * H100["solve efficiency"]
    )
    print(f"For comparison, one H100 alone: about {one_gpu:.0f} s per block, "
          f"{one_gpu * LAYERS / 3600:.1f} hours, with its 8 tasks' streams "
          f"({human(8 * 2 * tokens_per_task * 8192 * 2)}) in pinned CPU memory or on disk.")  # fmt: skip


def _statistics_flops(group: Group, method: str, tokens: int) -> float:
    """Flops of a group's raw sums over `tokens` (docs/algorithm.md s.5)."""
    d, big = group.d_in, group.d_out
    if group.kind != "linear":
        return 10.0 * tokens * d
    gram = 2 * tokens * d * d
    return gram + (2 * tokens * d * d if method == "cross" else 2 * tokens * d * big)


if __name__ == "__main__":
    main()
