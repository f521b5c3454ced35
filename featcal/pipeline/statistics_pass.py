"""The statistics pass of one task over one block (featcal-math.md s.2, step 2).

Per batch, expert t's block runs on E_t with hooks that cache what the statistics need from
it (its output is the next E_t); then the uncalibrated merged block runs on S_t with pre-hooks
that feed each group's input straight into the statistics, so no activation outlives its
batch, and that stop the forward after the last calibrated module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..config import FeatCalConfig
from ..errors import FeatCalError
from ..io.offload import Stream
from ..models.adapters import ModelAdapter
from ..models.capture import Streams, run_block, run_until_stopped, stop_forward
from ..models.modules import LINEAR, ModuleRef, calibrated_modules
from .statistics import (
    BlockPlan,
    ExpertCache,
    LinearMoments,
    NormMoments,
    TaskStatistics,
    discover_plan,
)


def module_input(args: tuple, kwargs: dict) -> Tensor:
    """The input tensor of a module call, positional or keyword."""
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


@contextmanager
def expert_hooks(modules: dict[str, ModuleRef], cache: ExpertCache) -> Iterator[None]:
    """While active, every forward of the expert block fills `cache`."""

    def on_input(name):
        return lambda module, args, kwargs: cache.on_input(name, module_input(args, kwargs))

    def on_output(name):
        return lambda module, args, output: cache.on_output(name, output)

    handles = []
    try:
        for name, ref in modules.items():
            handles.append(ref.module.register_forward_pre_hook(on_input(name), with_kwargs=True))
            if ref.kind == LINEAR:
                handles.append(ref.module.register_forward_hook(on_output(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def student_hooks(
    plan: BlockPlan, modules: dict[str, ModuleRef], stats: TaskStatistics, where: str
) -> Iterator[None]:
    """While active, a forward of the merged block accumulates `stats` and stops after plan.last."""
    leader_inputs: dict[int, Tensor] = {}

    def hook_for(i: int, name: str, leader: bool):
        def hook(module, args, kwargs):
            x = module_input(args, kwargs)
            if leader:
                stats.accumulate(i, x)
                leader_inputs[i] = x
            elif leader_inputs.get(i) is not x:
                raise FeatCalError(
                    f"{where}: module {name!r} no longer reads the same input as "
                    f"{plan.groups[i].leader.name!r}, as it did in the first batch"
                )
            if name == plan.last:
                leader_inputs.clear()
                stop_forward()

        return hook

    handles = []
    try:
        for i, group in enumerate(plan.groups):
            for k, name in enumerate(group.names):
                module = modules[name].module
                handles.append(module.register_forward_pre_hook(hook_for(i, name, k == 0), with_kwargs=True))
        yield
    finally:
        leader_inputs.clear()
        for handle in handles:
            handle.remove()


def discover_block(
    adapter: ModelAdapter,
    index: int,
    num_blocks: int,
    merged_mods: dict[str, ModuleRef],
    expert_block: torch.nn.Module,
    streams: Streams,
) -> tuple[BlockPlan, torch.Tensor, ExpertCache]:
    """Run an expert block on its first batch recording every module's input: modules that
    receive the same tensor form a group. Returns the plan, the output and the recording (the
    statistics pass of that batch reuses both)."""
    recording = ExpertCache(record_all=True)
    with expert_hooks(calibrated_modules(expert_block), recording):
        output = run_block(adapter, expert_block, streams.expert[0], streams.expert_ctx[0])
    plan = discover_plan(
        recording.order,
        recording.inputs,
        merged_mods,
        lambda name: adapter.token_focus(index, num_blocks, name),
        f"block {index}",
        adapter.memory_inputs,
    )
    return plan, output, recording


def statistics_pass(
    adapter: ModelAdapter,
    plan: BlockPlan,
    block: torch.nn.Module,
    expert_block: torch.nn.Module,
    streams: Streams,
    *,
    config: FeatCalConfig,
    dtype: torch.dtype,
    device: torch.device,
    task: str,
    index: int,
    first: tuple[torch.Tensor, ExpertCache] | None = None,
) -> tuple[list[LinearMoments | NormMoments], Stream]:
    """One task's statistics of the merged block (uncalibrated) and the expert's block outputs.

    `first`: the expert's output and cache for batch 0 when `discover_block` already ran it.
    """
    merged_mods = calibrated_modules(block)
    expert_mods = calibrated_modules(expert_block)
    stats = TaskStatistics(
        plan,
        expert_mods,
        alpha=config.teacher_interp_alpha,
        tokens=streams.tokens,
        cross_method=config.cross_method,
        tf32=config.allow_tf32,
        dtype=dtype,
        device=device,
        where=f"task {task!r}, block {index}",
    )
    cache = ExpertCache()
    cache.need_inputs, cache.need_outputs = stats.needs()
    outputs = streams.new_stream("expert")
    with expert_hooks(expert_mods, cache), student_hooks(plan, merged_mods, stats, f"block {index}"):
        for i, (hidden, expert_hidden) in enumerate(zip(streams.student, streams.expert)):
            if i == 0 and first is not None:
                out, batch_cache = first
            else:
                out = run_block(adapter, expert_block, expert_hidden, streams.expert_ctx[i])
                batch_cache = cache
            stats.begin_batch(streams.weights[i], batch_cache, streams.memory_weights[i])
            run_until_stopped(run_block, adapter, block, hidden, streams.student_ctx[i])
            stats.end_batch()
            batch_cache.clear()
            outputs.append(out)
    return stats.finish(), outputs
