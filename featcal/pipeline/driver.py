"""The forward-order driver: `calibrate` re-solves the merged model block by block (docs/algorithm.md s.2).

    for each stage (T5: encoder, then decoder):
        capture the block-0 inputs of every task (student and expert streams)
        for each block:
            discover the module groups
            for each task:  accumulate -> reduce -> fold       (one task's sums alive at a time),
                            then measure the merged model's drift
            solve and write the block
            for each task:  propagate, measure the calibrated drift
            write the block to the output checkpoint

The phases are the functions of `featcal.pipeline.phases`; the streams between them are owned
by a `RunState`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..config import FeatCalConfig
from ..errors import FeatCalError
from ..io.checkpoint import atomic_directory, check_output, save_model
from ..io.output_checkpoint import OutputCheckpoint
from ..models.capture import capture_first_block_inputs
from ..models.modules import unknown_norms
from ..models.sources import ModelLike, ModelSource, device_of, open_source
from .checks import check_architecture, check_batches, check_tasks
from .memory_plan import MemoryPlan, choose_placement, estimate, parse_bytes
from .phases import (
    BlockRun,
    accumulate,
    discover,
    fold,
    later_contexts,
    measure_calibrated,
    measure_merged,
    new_sums,
    propagate,
    reduce,
    solve,
)
from .report import BlockReport, CalibrationReport, peak_cpu_rss_bytes
from .solver import BlockSystem
from .stage_inputs import capture_stage, examples
from .state import RunState

log = logging.getLogger("featcal")


class Calibrated(NamedTuple):
    """What `calibrate` returns: the calibrated model (the output directory when the merged model
    was given as a checkpoint path) and the run's report."""

    model: nn.Module | Path
    report: CalibrationReport


@torch.no_grad()
def calibrate(
    merged: ModelLike,
    *,
    base: ModelLike,
    experts: Mapping[str, ModelLike],
    data: Mapping[str, Iterable],
    config: FeatCalConfig | None = None,
    device: str | torch.device | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Calibrated:
    """Calibrate `merged` with FeatCal and return it with a report.

    merged: a module, calibrated in place (if the run stops with an error, the blocks before the
    failing one are already calibrated); or a local safetensors checkpoint directory, read block
    by block, each calibrated block written to `out` as soon as it is done (a 70B model never
    sits in memory). base, experts (task -> model): modules, checkpoint directories (read
    lazily, one block at a time) or hub ids, all of the merged model's architecture. data: task
    -> iterable of batches, each a tensor (the model's first input) or a dict of keyword inputs
    (`pixel_values`, or `input_ids` with `attention_mask`, ...). device: where blocks and streams
    run (default: the merged module's device; the CPU for a checkpoint). out: output checkpoint
    directory (needed for a merged checkpoint; for a module, it is also saved there), written
    under a temporary name and renamed when complete; `overwrite` replaces an existing one.
    """
    cfg = config or FeatCalConfig()
    tasks = check_tasks(experts, data)
    streamed = not isinstance(merged, nn.Module)
    if streamed and out is None:
        raise FeatCalError(
            "the merged model is a checkpoint path: give out= (--out), the directory that receives "
            "the calibrated blocks as they are done"
        )
    if out is not None:
        check_output(out, overwrite)
    student = open_source(merged, "merged model")
    if streamed and student.lazy is None:
        raise FeatCalError(f"the merged model {merged} must be a local directory of safetensors files")
    base_src = open_source(base, "base model", student.dtype)
    expert_srcs = {t: open_source(experts[t], f"expert {t!r}", student.dtype) for t in tasks}
    for source in (base_src, *expert_srcs.values()):
        check_architecture(student, source)
    if device is not None:
        device = torch.device(device)
    else:
        device = torch.device("cpu") if streamed else device_of(student.model)
    if out is None:
        return Calibrated(merged, _run(student, base_src, expert_srcs, data, cfg, device, None))
    with atomic_directory(out, overwrite) as tmp:
        if streamed:
            output = OutputCheckpoint(student.lazy, student.blocks, tmp)
            report = _run(student, base_src, expert_srcs, data, cfg, device, output)
            output.finish()
        else:
            report = _run(student, base_src, expert_srcs, data, cfg, device, None)
            save_model(merged, tmp)
        report.write_json(tmp / "featcal_report.json")
    return Calibrated(Path(out) if streamed else merged, report)


def _run(
    student: ModelSource,
    base: ModelSource,
    experts: dict[str, ModelSource],
    data: Mapping[str, Iterable],
    cfg: FeatCalConfig,
    device: torch.device,
    output: OutputCheckpoint | None,
) -> CalibrationReport:
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    in_memory = [s.model for s in (student, base, *experts.values()) if s.lazy is None]
    training = {id(m): m.training for m in in_memory}
    collector = _WarningCollector()
    logging.getLogger("featcal").addHandler(collector)
    state: RunState | None = None
    try:
        for m in in_memory:
            m.eval()
        if student.lazy is None:
            student.model.to(device)
        _warn_unknown_norms(student)
        batches = {t: check_batches(t, data[t]) for t in experts}
        plan = _plan(student, batches, cfg, device)
        if cfg.progress:
            print(plan.describe(), file=sys.stderr)
        state = RunState(plan.placement, device, cfg.offload_dir)
        blocks: list[BlockReport] = []
        bar = tqdm(
            total=sum(len(b) for b in student.blocks), desc="featcal: blocks", disable=not cfg.progress
        )
        for stage in range(len(student.stages)):
            state.end_stage(capture_stage(stage, student, experts, batches, state, cfg, device))
            if stage == 0:
                tasks_info = {
                    t: {"batches": len(s.student), "tokens": s.tokens} for t, s in state.tasks.items()
                }
            for index in range(len(student.blocks[stage])):
                block_started = time.perf_counter()
                with student.block(stage, index, device) as block:
                    report = _calibrate_block(stage, index, block, student, base, experts, state, cfg, device)
                    if output is not None:
                        output.write(stage, index, block)
                del block  # a block read from disk is freed before the next one is read
                report.index, report.seconds = len(blocks), time.perf_counter() - block_started
                blocks.append(report)
                bar.update()
                if report.drift_calibrated is not None:
                    bar.set_postfix(drift=f"{report.drift_merged:.3f}->{report.drift_calibrated:.3f}")
        bar.close()
    finally:
        logging.getLogger("featcal").removeHandler(collector)
        if state is not None:
            state.close()
        for m in in_memory:
            m.train(training[id(m)])

    return CalibrationReport(
        blocks=blocks,
        tasks=tasks_info,
        wall_seconds=time.perf_counter() - started,
        device=str(device),
        peak_cpu_rss_bytes=peak_cpu_rss_bytes(),
        peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        config=cfg.to_dict(),
        backend=ops.backend_info(),
        memory_plan=plan.to_dict(),
        warnings=collector.messages,
    )


def _calibrate_block(
    stage: int,
    index: int,
    block: nn.Module,
    student: ModelSource,
    base: ModelSource,
    experts: dict[str, ModelSource],
    state: RunState,
    cfg: FeatCalConfig,
    device: torch.device,
) -> BlockReport:
    """The phases of one block, in order (see the module docstring)."""
    run = BlockRun(
        adapter=student.stages[stage],
        index=index,
        num_blocks=len(student.blocks[stage]),
        where=student.where(stage, index),
        config=cfg,
        dtype=ops.accumulator_dtype(next(block.parameters()).dtype),
        device=device,
    )
    tasks = state.tasks
    measure = next(iter(tasks.values())).drift is not None
    report = BlockReport(index=index, seconds=0.0, stage=run.where.stage)
    plan = system = None
    for task, s in tasks.items():
        with experts[task].block(stage, index, device) as expert_block:
            first = None
            if plan is None:
                plan, first = discover(run, block, expert_block, s.inputs())
                if plan.skipped:
                    log.warning(
                        "%s: modules %s are never called and keep their merged values",
                        run.where,
                        plan.skipped,
                    )
                system = BlockSystem.zeros(plan, run.dtype, device)
            sums = new_sums(run, plan, s.tokens)
            outputs = s.new_stream("expert")
            accumulate(run, plan, block, expert_block, s.inputs(), sums, outputs, task=task, first=first)
            fold(run, system, reduce(sums), expert_block, task)
            s.advance_expert(outputs, later_contexts(run, expert_block, s.expert, s.expert_ctx, s.home))
        del sums, expert_block, first
        if measure:
            report.drift_merged_per_task[task] = measure_merged(run, block, s)

    with base.block(stage, index, device) as base_block:
        solve(run, system, plan, block, base_block)
    del system, base_block

    last = index == run.num_blocks - 1 and stage == len(student.stages) - 1
    for task, s in tasks.items():
        if not last:
            propagate(run, block, s)
        if measure:
            report.drift_calibrated_per_task[task] = measure_calibrated(run, block, s, propagated=not last)
    if measure:
        report.drift_merged = _mean(report.drift_merged_per_task.values())
        report.drift_calibrated = _mean(report.drift_calibrated_per_task.values())
    return report


def _warn_unknown_norms(student: ModelSource) -> None:
    """Report modules that look like norms but compute no known formula: they stay merged.
    One warning per module name and stage, naming the blocks that have it."""
    found: dict[tuple[int, str, str], list[int]] = {}
    for stage, blocks in enumerate(student.blocks):
        for index, block in enumerate(blocks):
            for name, cls in unknown_norms(block, student.stages[stage].module_kind).items():
                found.setdefault((stage, name, cls), []).append(index)
    for (stage, name, cls), indices in found.items():
        where = student.where(stage, indices[0]).at(module=name)
        others = f" (and in blocks {indices[1:]})" if len(indices) > 1 else ""
        log.warning(
            "%s%s: a %s has a 1-D weight and an eps like a norm, but computes none of LayerNorm, "
            "RMSNorm or (1 + w) RMSNorm on a probe input (or fails on one); it keeps its merged "
            "values (give the adapter a module_kind to calibrate it)",
            where,
            others,
            cls,
        )


def _plan(student: ModelSource, batches: dict[str, list], cfg: FeatCalConfig, device) -> MemoryPlan:
    """The memory plan, from the merged model's shapes and one probe of its front on one batch."""
    first = next(iter(batches.values()))[0]
    with student.front(0, device) as model:
        hidden, ctx = capture_first_block_inputs(student.adapter, model, first, device)
    count, tokens, width = hidden.shape
    sizes = []
    for task_batches in batches.values():
        for batch in task_batches:
            length = student.adapter.sequence_length(batch)
            sizes.append((examples(batch), tokens if length is None else length, width))
    context = int(ctx.nbytes() / count * sum(n for n, _, _ in sizes)) * 2
    plan = estimate(
        [b for stage in student.blocks for b in stage],
        max(student.block_bytes(k, i) for k, stage in enumerate(student.blocks) for i in range(len(stage))),
        hidden.dtype,
        ops.accumulator_dtype(hidden.dtype),
        sizes,
        context,
        len(batches),
        device,
        student.adapter.module_kind,
    )
    return choose_placement(
        plan, cfg.stream_placement, parse_bytes(cfg.max_gpu_memory), parse_bytes(cfg.max_cpu_memory)
    )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


class _WarningCollector(logging.Handler):
    """Keeps the featcal warnings of a run for its report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
