"""The phases of one block (docs/algorithm.md s.2), each a function of what it needs.

    discover    one expert forward shows which modules share an input: the block's plan
    accumulate  per (task, batch) this process owns: expert block and merged block with hooks,
                raw sums into a task's TaskSums, the expert's outputs into a stream
    reduce      a task's raw sums combined across work items (identity in one process)
    fold        a task's reduced sums normalised and folded into the block's system
    solve       the system solved per module group, the new parameters written into the block
    propagate   the calibrated block on the student stream (replay_expert: an expert block on
                the expert stream alone, forward only)
    measure     the report's drift, of the merged model as given and of the calibrated one

accumulate, fold and solve take the plan (or a plan cut to some groups, `BlockPlan.only`) they
work on: with sequential statistics (docs/algorithm.md s.12) the driver runs accumulate ->
reduce -> fold -> solve once per step of the block, each on the block as the steps before it
left it. The driver runs them in this order; nothing here keeps state between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor, nn

from .. import ops
from ..config import FeatCalConfig
from ..errors import Location
from ..models.adapters import ModelAdapter
from ..models.capture import BlockContext, run_block, run_until_stopped
from ..models.modules import ModuleRef, calibrated_modules
from .hooks import expert_hooks, student_hooks
from .plan import BlockPlan, discover_plan
from .solver import BlockSystem, Update, anchors_of
from .state import BlockInputs, TaskState
from .statistics import Accumulator, ExpertCache, TaskSums, normalise, project

AllReduce = Callable[[list[Tensor]], None]  # sums each tensor in place across processes


class Sink(Protocol):
    """Where accumulate puts the expert block's output of each batch (a Stream, a list)."""

    def append(self, value: Tensor) -> None: ...


@dataclass(frozen=True)
class BlockRun:
    """One block of one stage, as every phase sees it."""

    adapter: ModelAdapter  # of the stage
    index: int
    num_blocks: int  # of the stage
    where: Location  # the stage and block, for messages
    config: FeatCalConfig
    dtype: torch.dtype  # of the statistics and solves
    device: torch.device

    @property
    def computes_later_arguments(self) -> bool:
        """Block 0 of a stage whose later blocks get arguments it computes (T5's position bias)."""
        return self.index == 0 and self.num_blocks > 1 and self.adapter.encdec.later_arguments is not None

    def call(self, block: nn.Module, hidden: Tensor, ctx: BlockContext) -> Tensor:
        """This block's output on `hidden`, with the arguments `ctx` holds for its layer type."""
        return run_block(self.adapter, block, hidden, ctx.for_block(self.index))

    def modules(self, block: nn.Module) -> dict[str, ModuleRef]:
        """The block's calibrated modules by name, as the adapter's module kinds find them."""
        return calibrated_modules(block, self.adapter.module_kind)


@dataclass
class FirstBatch:
    """The expert's output and recording of batch 0, made by `discover` and reused by `accumulate`."""

    output: Tensor
    cache: ExpertCache


def discover(
    run: BlockRun, block: nn.Module, expert_block: nn.Module, inputs: BlockInputs
) -> tuple[BlockPlan, FirstBatch]:
    """Run the expert block on its first batch recording every module's input: modules that
    receive the same tensor form a group. `block` is the merged block the plan will drive."""
    recording = ExpertCache(record_all=True)
    with expert_hooks(run.modules(expert_block), recording):
        output = run.call(expert_block, inputs.expert[0], inputs.expert_ctx[0])
    plan = discover_plan(
        recording.order,
        recording.inputs,
        run.modules(block),
        lambda name: run.adapter.token_focus(run.index, run.num_blocks, name),
        run.where,
        run.adapter.encdec.memory_inputs,
        run.adapter.token_axis,
    )
    return plan, FirstBatch(output, recording)


def new_sums(run: BlockRun, plan: BlockPlan, tokens: int) -> TaskSums:
    """Empty sums of a task whose batches hold `tokens` tokens in all (over every process)."""
    cfg = run.config
    return TaskSums.zeros(
        plan,
        tokens=tokens,
        alpha=cfg.teacher_interp_alpha,
        cross_method=cfg.cross_method,
        dtype=run.dtype,
        device=run.device,
    )


def accumulate(
    run: BlockRun,
    plan: BlockPlan,
    block: nn.Module,
    expert_block: nn.Module,
    inputs: BlockInputs,
    sums: TaskSums,
    outputs: Sink | None,
    *,
    task: str | None,
    first: FirstBatch | None = None,
) -> None:
    """Add one task's batches into `sums` (made for `plan`) and append the expert block's output
    of each batch to `outputs`. The merged block runs as it is now and stops at the plan's last
    module. Without `outputs` the expert block runs only until the sums have what they need
    from it (not at all for norm groups alone). `first`: batch 0 of the expert, already run."""
    where = run.where.at(task=task)
    expert_mods = run.modules(expert_block)
    config = run.config
    stats = Accumulator(
        sums, expert_mods, alpha=config.teacher_interp_alpha, precision=config.float32_precision, where=where
    )
    cache = ExpertCache(stop_early=outputs is None)
    cache.need_inputs, cache.need_outputs = sums.needs()
    needs_expert = not cache.complete()  # norm groups alone read nothing of the expert
    with expert_hooks(expert_mods, cache), student_hooks(plan, run.modules(block), stats, where):
        for i, (hidden, expert_hidden) in enumerate(zip(inputs.student, inputs.expert)):
            out, batch_cache = None, cache
            if i == 0 and first is not None:
                out, batch_cache = first.output, first.cache
            elif outputs is not None:
                out = run.call(expert_block, expert_hidden, inputs.expert_ctx[i])
            elif needs_expert:
                run_until_stopped(run.call, expert_block, expert_hidden, inputs.expert_ctx[i])
            stats.begin_batch(inputs.weights[i], batch_cache, inputs.memory_weights[i])
            run_until_stopped(run.call, block, hidden, inputs.student_ctx[i])
            stats.end_batch()
            batch_cache.clear()
            if outputs is not None:
                outputs.append(out)


def reduce(sums: TaskSums, all_reduce: AllReduce | None = None) -> TaskSums:
    """A task's raw sums combined over every work item of the task. In one process they already
    are; with `all_reduce` (a collective over the processes that share the task) each tensor is
    summed in place. Nothing before this point is nonlinear in the tokens."""
    if all_reduce is not None:
        all_reduce(sums.tensors())
    return sums


def fold(run: BlockRun, system: BlockSystem, sums: TaskSums, expert_block: nn.Module, task: str) -> None:
    """Normalise a task's reduced sums and fold them, with its expert's parameters, into `system`."""
    where = run.where.at(task=task)
    expert = run.modules(expert_block)
    system.count_tokens([s.weight for s in sums.groups])
    moments = normalise(sums, expert, alpha=run.config.teacher_interp_alpha, where=where)
    system.fold([project(m, expert) for m in moments], expert, run.config.covariance_eps, where)


def solve(
    run: BlockRun,
    system: BlockSystem,
    plan: BlockPlan,
    block: nn.Module,
    base_block: nn.Module | None,
    groups: Sequence[int] | None = None,
) -> list[Update]:
    """Solve the plan's groups (default: all) and write the new parameters into `block`; the
    anchors come from the block as it is before the write."""
    merged = run.modules(block)
    base = None if base_block is None else run.modules(base_block)
    selected = plan if groups is None else plan.only(groups)
    anchors = anchors_of(selected, merged, base, run.config.anchor_blend_rho, run.dtype, run.device)
    updates = system.solve(anchors, run.config, groups, run.where)
    for module, which, value in updates:
        (merged[module].set_weight if which == "weight" else merged[module].set_bias)(value)
    return updates


def later_contexts(
    run: BlockRun,
    first_block: nn.Module,
    hidden: Sequence[Tensor],
    contexts: Sequence[BlockContext],
    home: torch.device,
) -> list[BlockContext] | None:
    """The captured arguments of a stage's later blocks, which its first block computes (T5);
    None when the block passes no such arguments on."""
    if not run.computes_later_arguments:
        return None
    later = []
    for h, ctx in zip(hidden, contexts):
        args, kwargs = run.adapter.encdec.later_arguments(first_block, *ctx.arguments(h))
        if ctx.hidden_keyword is not None:
            kwargs = {k: v for k, v in kwargs.items() if k != ctx.hidden_keyword}
        else:
            args = args[1:]
        later.append(replace(ctx, args=tuple(args), kwargs=kwargs).to(home))
    return later


def propagate(run: BlockRun, block: nn.Module, task: TaskState) -> None:
    """The calibrated block on the task's student stream: the next student stream."""
    outputs = _forward(run, block, task.student, task.student_ctx, task.new_stream("student"))
    task.advance_student(outputs, later_contexts(run, block, task.student, task.student_ctx, task.home))


def replay_expert(run: BlockRun, expert_block: nn.Module, task: TaskState) -> None:
    """The expert block on the task's expert stream alone, without statistics (forward only)."""
    outputs = _forward(run, expert_block, task.expert, task.expert_ctx, task.new_stream("expert"))
    task.advance_expert(outputs, later_contexts(run, expert_block, task.expert, task.expert_ctx, task.home))


def _forward(run: BlockRun, block: nn.Module, hidden, contexts, outputs):
    for i, h in enumerate(hidden):
        outputs.append(run.call(block, h, contexts[i]))
    return outputs


def measure_merged(run: BlockRun, block: nn.Module, task: TaskState) -> Tensor:
    """The merged model as given: its uncalibrated block on the drift examples, which advances
    them; returns their new hidden states (`drift` against the expert's output)."""
    ctx = task.drift_ctx
    later = later_contexts(run, block, [task.drift], [ctx], task.drift.device)
    hidden = run.call(block, task.drift, ctx)
    task.set_drift(hidden, ctx if later is None else later[0])
    return hidden


def measure_calibrated(run: BlockRun, block: nn.Module, task: TaskState, propagated: bool) -> float:
    """The calibrated block's drift on the drift examples: from the propagated student stream, or
    (after the last block, where nothing is propagated) from a forward of those examples alone."""
    count = len(task.drift)
    if propagated:
        out = task.student[0]
    else:
        out = run.call(block, task.student[0][:count], task.drift_ctx)
    return drift(out[:count], task.expert[0], task.weights[0])


def drift(student: Tensor, expert: Tensor, weights: Tensor | None) -> float:
    """||S - E|| / ||E|| over the non-padding tokens of the first len(student) examples."""
    count = student.shape[0]
    dtype = ops.accumulator_dtype(expert.dtype)
    e = expert[:count].to(dtype)
    diff = (student.to(dtype) - e).square().sum(-1)
    ref = e.square().sum(-1)
    if weights is not None:
        keep = weights[:count] > 0  # (what a model leaves at padding, even NaN, is not read)
        diff, ref = diff.where(keep, 0), ref.where(keep, 0)
    return float((diff.sum() / ref.sum()).sqrt())
