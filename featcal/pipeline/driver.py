"""The forward-order driver: `calibrate` re-solves the merged model block by block (featcal-math.md s.2).

Per task t the driver keeps two streams of hidden states at the current block boundary: the
student S_t (merged model, earlier blocks already calibrated) and the expert E_t. For block l:

  1. per task and batch: expert t's block runs on E_t (its output is the next E_t) while its
     hooks cache what the statistics need; then the uncalibrated merged block runs on S_t with
     hooks that accumulate the statistics and stop the forward after the last calibrated module;
  2. each task's statistics are folded into the block's normal equations as soon as it ends;
  3. the block is solved and its new parameters written into the merged model;
  4. the calibrated block runs on S_t to give the next S_t.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import ops
from ..config import FeatCalConfig
from ..errors import FeatCalError
from ..io.checkpoint import atomic_directory, check_output, save_model
from ..io.offload import Stream
from ..io.output_checkpoint import OutputCheckpoint
from ..models.adapters import ModelAdapter
from ..models.capture import (
    Streams,
    backbone_inputs,
    capture_first_block_inputs,
    run_block,
    same_context,
    token_weights,
)
from ..models.modules import ModuleRef, calibrated_modules
from ..models.sources import ModelLike, ModelSource, device_of, open_source
from .memory_plan import MemoryPlan, choose_placement, estimate, parse_bytes
from .report import BlockReport, CalibrationReport, peak_cpu_rss_bytes
from .solver import BlockSystem
from .statistics_pass import discover_block, statistics_pass

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
        _check_architecture(student, source)
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
    offload_dir, streams = None, {}
    try:
        for m in in_memory:
            m.eval()
        if student.lazy is None:
            student.model.to(device)
        batches = {t: _check_batches(t, data[t]) for t in experts}
        plan = _plan(student, batches, cfg, device)
        if cfg.progress:
            print(plan.describe(), file=sys.stderr)
        if plan.placement == "disk":
            if cfg.offload_dir is not None:
                Path(cfg.offload_dir).mkdir(parents=True, exist_ok=True)
            offload_dir = Path(tempfile.mkdtemp(prefix="featcal-streams-", dir=cfg.offload_dir))
        counter = itertools.count()

        def new_stream(kind: str) -> Stream:
            return Stream(plan.placement, device, offload_dir, name=f"{kind}-{next(counter)}")

        blocks: list[BlockReport] = []
        total = sum(len(b) for b in student.blocks)
        bar = tqdm(total=total, desc="featcal: blocks", disable=not cfg.progress)
        home = device if plan.placement == "device" else torch.device("cpu")  # of the block arguments
        for k in range(len(student.stages)):
            previous = streams
            streams = _capture_stage(
                k,
                student,
                experts,
                batches,
                previous=previous,
                device=device,
                home=home,
                cfg=cfg,
                new_stream=new_stream,
            )
            for s in previous.values():
                s.close()
            if k == 0:
                tasks_info = {t: {"batches": len(s.student), "tokens": s.tokens} for t, s in streams.items()}
            for index in range(len(student.blocks[k])):
                block_started = time.perf_counter()
                with student.block(k, index, device) as block:
                    report = _calibrate_block(k, index, block, student, base, experts, streams, cfg, device)
                    if output is not None:
                        output.write(k, index, block)
                del block  # a block read from disk is freed before the next one is read
                report.index, report.seconds = len(blocks), time.perf_counter() - block_started
                blocks.append(report)
                bar.update()
                if report.drift_calibrated is not None:
                    bar.set_postfix(drift=f"{report.drift_merged:.3f}->{report.drift_calibrated:.3f}")
        bar.close()
    finally:
        logging.getLogger("featcal").removeHandler(collector)
        for s in streams.values():
            s.close()
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
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


def _plan(student: ModelSource, batches: dict[str, list], cfg: FeatCalConfig, device) -> MemoryPlan:
    """The memory plan, from the merged model's shapes and one probe of its front on one batch."""
    first = next(iter(batches.values()))[0]
    with student.front(0, device) as model:
        hidden, ctx = capture_first_block_inputs(student.adapter, model, first, device)
    examples, tokens, width = hidden.shape
    sizes = []
    for task_batches in batches.values():
        for batch in task_batches:
            ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
            n = _examples(batch)
            sizes.append((n, ids.shape[1] if ids is not None and ids.dim() == 2 else tokens, width))
    context = int(ctx.nbytes() / examples * sum(n for n, _, _ in sizes)) * 2
    plan = estimate(
        [b for stage in student.blocks for b in stage],
        max(student.block_bytes(k, i) for k, stage in enumerate(student.blocks) for i in range(len(stage))),
        hidden.dtype,
        ops.accumulator_dtype(hidden.dtype),
        sizes,
        context,
        len(batches),
        device,
    )
    return choose_placement(
        plan, cfg.stream_placement, parse_bytes(cfg.max_gpu_memory), parse_bytes(cfg.max_cpu_memory)
    )


def _examples(batch) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    return next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0)


def _check_batches(task: str, batches: Iterable) -> list:
    batches = list(batches)
    if not batches:
        raise FeatCalError(f"task {task!r} has no calibration data: its batch iterable is empty")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (Tensor, Mapping)):
            raise FeatCalError(
                f"task {task!r}: batch {i} is a {type(batch).__name__}; a batch must be a "
                "tensor or a dict of tensors"
            )
    return batches


def _calibrate_block(
    stage: int,
    index: int,
    block: nn.Module,
    student: ModelSource,
    base: ModelSource,
    experts: dict[str, ModelSource],
    streams: dict[str, Streams],
    cfg: FeatCalConfig,
    device: torch.device,
) -> BlockReport:
    adapter, num_blocks = student.stages[stage], len(student.blocks[stage])
    dtype = ops.accumulator_dtype(next(block.parameters()).dtype)
    where = f"block {index}"
    merged_mods = calibrated_modules(block)
    tasks = list(streams)
    later = adapter.later_arguments if index == 0 and num_blocks > 1 else None

    measure = streams[tasks[0]].drift is not None
    report = BlockReport(index=index, seconds=0.0, stage=adapter.name if len(student.stages) > 1 else None)
    system = first = None
    for task in tasks:
        s = streams[task]
        with experts[task].block(stage, index, device) as expert_block:
            if system is None:
                # The first expert block's first batch shows which modules share an input;
                # its statistics pass reuses that forward.
                plan, *first = discover_block(adapter, index, num_blocks, merged_mods, expert_block, s)
                if plan.skipped:
                    message = "%s: modules %s are never called and keep their merged values"
                    log.warning(message, where, plan.skipped)
                system = BlockSystem(plan, cfg, dtype, device)
            moments, next_expert = statistics_pass(
                adapter,
                plan,
                block,
                expert_block,
                s,
                config=cfg,
                dtype=dtype,
                device=device,
                task=task,
                index=index,
                first=tuple(first) if first else None,
            )
            first = None
            system.add(moments, calibrated_modules(expert_block))
            if later is not None:
                s.expert_ctx = _later_contexts(adapter, expert_block, s.expert, s.expert_ctx, s.home)
        del moments, expert_block
        s.expert.close()
        s.expert = next_expert
        if measure:
            # The merged model as given: its uncalibrated block on the drift examples.
            ctx = s.drift_ctx
            if later is not None:
                (s.drift_ctx,) = _later_contexts(adapter, block, [s.drift], [ctx], s.drift.device)
            s.drift = run_block(adapter, block, s.drift, ctx)
            report.drift_merged_per_task[task] = _drift(s.drift, s.expert[0], s.weights[0])

    with base.block(stage, index, device) as base_block:
        for ref, which, value in system.solve(merged_mods, calibrated_modules(base_block)):
            if which == "weight":
                ref.set_weight(value)
            else:
                ref.set_bias(value)
    del system, base_block

    last = index == num_blocks - 1 and stage == len(student.stages) - 1
    for task in tasks:
        s = streams[task]
        if not last:
            outputs = s.new_stream("student")
            for i, h in enumerate(s.student):
                outputs.append(run_block(adapter, block, h, s.student_ctx[i]))
            if later is not None:
                s.student_ctx = _later_contexts(adapter, block, s.student, s.student_ctx, s.home)
            s.student.close()
            s.student = outputs
        if measure:
            # After the last block only the drift examples need the calibrated block's output.
            count = len(s.drift)
            out = run_block(adapter, block, s.student[0][:count], s.drift_ctx) if last else s.student[0]
            report.drift_calibrated_per_task[task] = _drift(out[:count], s.expert[0], s.weights[0])
    if measure:
        report.drift_merged = _mean(report.drift_merged_per_task.values())
        report.drift_calibrated = _mean(report.drift_calibrated_per_task.values())
    return report


def _later_contexts(
    adapter: ModelAdapter, first_block: nn.Module, hidden, contexts: list, home: torch.device
) -> list:
    """The captured arguments of the blocks after the first, which the first block computes (T5)."""
    later = []
    for h, ctx in zip(hidden, contexts):
        args, kwargs = adapter.later_arguments(first_block, *ctx.arguments(h))
        if ctx.hidden_as_kwarg:
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        else:
            args = args[1:]
        later.append(replace(ctx, args=tuple(args), kwargs=kwargs).to(home))
    return later


def _capture_stage(
    stage: int,
    student: ModelSource,
    experts: dict[str, ModelSource],
    batches: dict[str, list],
    *,
    previous: dict[str, Streams],
    device: torch.device,
    home: torch.device,
    cfg: FeatCalConfig,
    new_stream,
) -> dict[str, Streams]:
    """Inputs of a stage's first block for every batch of every task, from the merged model and
    from each expert; a later stage's come from the previous stage's final streams. Captured
    block arguments are kept on `home`."""
    adapter = student.stages[stage]
    streams = {t: Streams(new_stream, home) for t in experts}
    inputs, heads = {}, {}
    for t in experts:
        prev = previous.get(t)
        if prev is None:
            inputs[t], heads[t] = batches[t], _head(batches[t][0], cfg.drift_examples)
        else:
            inputs[t] = _stage_batches(student, stage, batches[t], prev.student, device)
            if prev.drift is not None:
                head = _head(batches[t][0], len(prev.drift))
                heads[t] = _stage_batches(student, stage, [head], [prev.drift], device)[0]
    with student.front(stage, device) as model:
        for t in tqdm(experts, desc="featcal: block inputs", disable=not cfg.progress):
            s = streams[t]
            if isinstance(inputs[t][0], Mapping):
                _warn_dropped(adapter, t, inputs[t][0])
            for batch in inputs[t]:
                hidden, ctx = capture_first_block_inputs(adapter, model, batch, device)
                s.student.append(hidden)
                s.student_ctx.append(ctx.to(home))
                s.weights.append(token_weights(adapter, batch, hidden))
                s.memory_weights.append(token_weights(adapter, batch, hidden, memory=True))
            if cfg.drift_examples != 0:
                s.drift, s.drift_ctx = capture_first_block_inputs(adapter, model, heads[t], device)
    for t, source in experts.items():
        s, prev = streams[t], previous.get(t)
        expert_inputs = batches[t]
        if prev is not None:
            expert_inputs = _stage_batches(source, stage, batches[t], prev.expert, device)
        with source.front(stage, device) as model:
            for i, batch in enumerate(expert_inputs):
                hidden, ctx = capture_first_block_inputs(adapter, model, batch, device)
                shape = s.student.shapes()[i]
                if tuple(hidden.shape) != tuple(shape):
                    raise FeatCalError(
                        f"task {t!r}: the expert's first block receives hidden states of shape "
                        f"{tuple(hidden.shape)} but the merged model's of shape {tuple(shape)}"
                    )
                s.expert.append(hidden)
                ctx = ctx.to(home)
                s.expert_ctx.append(s.student_ctx[i] if same_context(ctx, s.student_ctx[i]) else ctx)
    return streams


def _stage_batches(source: ModelSource, stage: int, batches: list, hidden, device: torch.device) -> list:
    """The backbone inputs of a later stage: each task batch with the previous stage's output."""
    prev, current = source.stages[stage - 1], source.stages[stage]
    with source.front(stage - 1, device) as model:
        backbone = prev.backbone(model)
        return [current.stage_inputs(b, prev.stage_output(backbone, h)) for b, h in zip(batches, hidden)]


def _head(batch, count: int | None):
    """The first `count` examples of a batch (all of them for None)."""
    size = _examples(batch)
    if count is None or count >= size:
        return batch
    if isinstance(batch, Tensor):
        return batch[:count]
    return {k: v[:count] if isinstance(v, Tensor) and v.shape[:1] == (size,) else v for k, v in batch.items()}


def _warn_dropped(adapter: ModelAdapter, task: str, batch: Mapping) -> None:
    _, dropped = backbone_inputs(adapter, batch)
    dropped = [key for key in dropped if key not in adapter.batch_keys]
    if dropped:
        message = "task %r: batch keys %s are not inputs of the %s backbone and are ignored"
        log.warning(message, task, dropped, adapter.name)


def _drift(student: Tensor, expert: Tensor, weights: Tensor | None) -> float:
    """||S - E|| / ||E|| over the non-padding tokens of the first len(student) examples."""
    count = student.shape[0]
    dtype = ops.accumulator_dtype(expert.dtype)
    e = expert[:count].to(dtype)
    diff = (student.to(dtype) - e).square().sum(-1)
    ref = e.square().sum(-1)
    if weights is not None:
        keep = weights[:count] > 0
        diff, ref = diff * keep, ref * keep
    return float((diff.sum() / ref.sum()).sqrt())


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def check_tasks(experts: Mapping, data: Mapping) -> list[str]:
    """The tasks, in order; an error if experts and data do not name the same tasks."""
    if not experts:
        raise FeatCalError("no experts given: experts must map each task to its fine-tuned model")
    no_data = sorted(set(experts) - set(data))
    no_expert = sorted(set(data) - set(experts))
    if no_data:
        raise FeatCalError(f"tasks {no_data} have an expert but no calibration data")
    if no_expert:
        raise FeatCalError(f"tasks {no_expert} have calibration data but no expert")
    return list(experts)


def _check_architecture(merged: ModelSource, other: ModelSource) -> None:
    """Same stages and blocks, same calibrated modules, same parameter shapes; else name the fault."""
    if [a.name for a in other.stages] != [a.name for a in merged.stages]:
        raise FeatCalError(
            f"the {other.role} is a {other.adapter.name} model but the merged model a {merged.adapter.name}"
        )
    for stage, (mine, theirs) in enumerate(zip(merged.blocks, other.blocks)):
        where = f"{merged.stages[stage].name} " if len(merged.stages) > 1 else ""
        if len(theirs) != len(mine):
            raise FeatCalError(
                f"the {other.role} has {len(theirs)} {where}blocks but the merged model has {len(mine)}"
            )
        for index, (mb, ob) in enumerate(zip(mine, theirs)):
            _check_block(f"{where}block {index}", calibrated_modules(mb), calibrated_modules(ob), other.role)


def _check_block(where: str, mine: dict[str, ModuleRef], theirs: dict[str, ModuleRef], role: str) -> None:
    if list(mine) != list(theirs):
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        raise FeatCalError(
            f"{where}: the {role} differs from the merged model: "
            f"modules missing there {missing}, modules only there {extra}"
        )
    for name, ref in mine.items():
        _check_module(where, name, ref, theirs[name], role)


def _check_module(where: str, name: str, ref: ModuleRef, other: ModuleRef, role: str) -> None:
    if other.kind != ref.kind:
        raise FeatCalError(
            f"{where}, module {name!r}: a {ref.kind} in the merged model but a {other.kind} in the {role}"
        )
    mine, theirs = ref.parameter_shapes(), other.parameter_shapes()
    for param in ("weight", "bias"):
        if mine.get(param) != theirs.get(param):
            raise FeatCalError(
                f"{where}, module {name!r}: {param} has shape {theirs.get(param)} in the "
                f"{role} but {mine.get(param)} in the merged model"
            )


class _WarningCollector(logging.Handler):
    """Keeps the featcal warnings of a run for its report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
