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

import logging
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import ops
from .adapters import ModelAdapter, find_adapter
from .capture import (
    BlockContext,
    Streams,
    backbone_inputs,
    capture_first_block_inputs,
    run_block,
    token_weights,
)
from .checkpoint import load_model
from .config import FeatCalConfig
from .errors import FeatCalError
from .modules import ModuleRef, calibrated_modules
from .report import BlockReport, CalibrationReport, peak_cpu_rss_bytes
from .solver import BlockSystem
from .statistics_pass import discover_block, statistics_pass

log = logging.getLogger("featcal")

ModelLike = nn.Module | str | os.PathLike


class Calibrated(NamedTuple):
    """What `calibrate` returns: the merged model (calibrated in place) and the run's report."""

    model: nn.Module
    report: CalibrationReport


class _Family:
    """A model with its adapter and its blocks."""

    def __init__(self, model: nn.Module, role: str) -> None:
        self.model, self.role = model, role
        self.adapter: ModelAdapter = find_adapter(model, role)
        self.blocks = list(self.adapter.blocks(self.adapter.backbone(model)))


@torch.no_grad()
def calibrate(
    merged: nn.Module,
    *,
    base: ModelLike,
    experts: Mapping[str, ModelLike],
    data: Mapping[str, Iterable],
    config: FeatCalConfig | None = None,
    device: str | torch.device | None = None,
) -> Calibrated:
    """Calibrate `merged` in place with FeatCal and return it with a report.

    The merged model's blocks are updated one after the other; if the run stops with an error,
    the blocks before the failing one are already calibrated.

    base: the pretrained model; experts: task -> fine-tuned model (same architecture as
    `merged`); base and experts may also be checkpoint directories or hub ids. data: task ->
    iterable of batches, each a tensor (the model's first input) or a dict of keyword inputs
    (`pixel_values`, or `input_ids` with `attention_mask`, ...). device: where blocks and
    streams live (default: the merged model's device).
    """
    cfg = config or FeatCalConfig()
    started = time.perf_counter()
    tasks = check_tasks(experts, data)
    base_model = _as_model(base, "base")
    expert_models = {t: _as_model(experts[t], f"expert {t!r}") for t in tasks}
    student = _Family(merged, "merged model")
    base_fam = _Family(base_model, "base model")
    expert_fams = {t: _Family(m, f"expert {t!r}") for t, m in expert_models.items()}
    _check_architecture(student, base_fam)
    for fam in expert_fams.values():
        _check_architecture(student, fam)

    device = torch.device(device) if device is not None else _device_of(merged)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dtype = ops.accumulator_dtype(next(student.blocks[0].parameters()).dtype)
    training = {id(m): m.training for m in (merged, base_model, *expert_models.values())}
    collector = _WarningCollector()
    logging.getLogger("featcal").addHandler(collector)
    try:
        merged.to(device).eval()
        base_model.eval()
        for m in expert_models.values():
            m.eval()
        streams = {
            t: _capture(student, expert_fams[t], t, data[t], device, cfg)
            for t in tqdm(tasks, desc="featcal: block inputs", disable=not cfg.progress)
        }
        blocks = []
        bar = tqdm(range(len(student.blocks)), desc="featcal: blocks", disable=not cfg.progress)
        for index in bar:
            block_started = time.perf_counter()
            report = _calibrate_block(index, student, base_fam, expert_fams, streams, cfg, dtype, device)
            report.seconds = time.perf_counter() - block_started
            blocks.append(report)
            if report.drift_calibrated is not None:
                bar.set_postfix(drift=f"{report.drift_merged:.3f}->{report.drift_calibrated:.3f}")
    finally:
        logging.getLogger("featcal").removeHandler(collector)
        for m in (merged, base_model, *expert_models.values()):
            m.train(training[id(m)])

    report = CalibrationReport(
        blocks=blocks,
        tasks={t: {"batches": len(s.student), "tokens": s.tokens} for t, s in streams.items()},
        wall_seconds=time.perf_counter() - started,
        device=str(device),
        peak_cpu_rss_bytes=peak_cpu_rss_bytes(),
        peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        config=cfg.to_dict(),
        backend=ops.backend_info(),
        warnings=collector.messages,
    )
    return Calibrated(merged, report)


def _calibrate_block(
    index: int,
    student: _Family,
    base: _Family,
    experts: dict[str, _Family],
    streams: dict[str, Streams],
    cfg: FeatCalConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> BlockReport:
    adapter, num_blocks = student.adapter, len(student.blocks)
    where = f"block {index}"
    block = student.blocks[index]
    merged_mods = calibrated_modules(block)
    tasks = list(streams)

    first = tasks[0]
    with _on_device(experts[first].blocks[index], device) as expert_block:
        plan, *first_batch = discover_block(
            adapter, index, num_blocks, merged_mods, expert_block, streams[first]
        )
    if plan.skipped:
        log.warning("%s: modules %s are never called and keep their merged values", where, plan.skipped)
    system = BlockSystem(plan, cfg, dtype, device)
    next_expert: dict[str, list[Tensor]] = {}
    for task in tasks:
        with _on_device(experts[task].blocks[index], device) as expert_block:
            moments, next_expert[task] = statistics_pass(
                adapter,
                plan,
                block,
                expert_block,
                streams[task],
                config=cfg,
                dtype=dtype,
                device=device,
                task=task,
                index=index,
                first=tuple(first_batch) if task == first else None,
            )
            system.add(moments, calibrated_modules(expert_block))
    del first_batch

    report = BlockReport(index=index, seconds=0.0)
    measure = streams[first].drift is not None
    if measure:
        for task in tasks:
            s = streams[task]
            s.drift = run_block(adapter, block, s.drift, s.drift_ctx)
            report.drift_merged_per_task[task] = _drift(s.drift, next_expert[task][0], s.weights[0])

    base_mods = calibrated_modules(base.blocks[index])
    for ref, which, value in system.solve(merged_mods, base_mods):
        if which == "weight":
            ref.set_weight(value)
        else:
            ref.set_bias(value)
    del system

    last = index == num_blocks - 1
    for task in tasks:
        s = streams[task]
        s.expert = next_expert[task]
        if not last:
            s.student = [run_block(adapter, block, h, s.student_ctx[i]) for i, h in enumerate(s.student)]
        if measure:
            # After the last block only the drift examples need the calibrated block's output.
            out = (
                run_block(adapter, block, s.student[0][: len(s.drift)], s.drift_ctx) if last else s.student[0]
            )
            report.drift_calibrated_per_task[task] = _drift(out[: len(s.drift)], s.expert[0], s.weights[0])
    if measure:
        report.drift_merged = _mean(report.drift_merged_per_task.values())
        report.drift_calibrated = _mean(report.drift_calibrated_per_task.values())
    return report


def _capture(
    student: _Family, expert: _Family, task: str, batches: Iterable, device, cfg: FeatCalConfig
) -> Streams:
    """Inputs of block 0 for every batch of a task, from the merged model and from the expert."""
    s = Streams()
    with _on_device(expert.model, device):
        for i, batch in enumerate(batches):
            if not isinstance(batch, (Tensor, Mapping)):
                raise FeatCalError(
                    f"task {task!r}: batch {i} is a {type(batch).__name__}; a batch must be a "
                    "tensor or a dict of tensors"
                )
            if i == 0 and isinstance(batch, Mapping):
                _, dropped = backbone_inputs(student.adapter, batch)
                if dropped:
                    log.warning(
                        "task %r: batch keys %s are not inputs of the %s backbone and are ignored",
                        task,
                        dropped,
                        student.adapter.name,
                    )
            hs, cs = capture_first_block_inputs(student.adapter, student.model, batch, device)
            he, ce = capture_first_block_inputs(expert.adapter, expert.model, batch, device)
            if he.shape != hs.shape:
                raise FeatCalError(
                    f"task {task!r}: the expert's first block receives hidden states of shape "
                    f"{tuple(he.shape)} but the merged model's of shape {tuple(hs.shape)}"
                )
            s.student.append(hs)
            s.expert.append(he)
            s.student_ctx.append(cs)
            s.expert_ctx.append(ce)
            s.weights.append(token_weights(student.adapter, batch, hs))
            if i == 0 and cfg.drift_examples != 0:
                s.drift, s.drift_ctx = _drift_inputs(student, batch, hs, cs, cfg.drift_examples, device)
    if not s.student:
        raise FeatCalError(f"task {task!r} has no calibration data: its batch iterable is empty")
    return s


def _drift_inputs(student: _Family, batch, hidden: Tensor, ctx: BlockContext, count, device):
    """The merged model's block-0 inputs for the first `count` examples of a batch."""
    if count is None or count >= hidden.shape[0]:
        return hidden, ctx
    size = hidden.shape[0]
    if isinstance(batch, Tensor):
        head = batch[:count]
    else:
        head = {
            k: v[:count] if isinstance(v, Tensor) and v.shape[:1] == (size,) else v for k, v in batch.items()
        }
    return capture_first_block_inputs(student.adapter, student.model, head, device)


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


def _check_architecture(merged: _Family, other: _Family) -> None:
    """Same number of blocks, same calibrated modules, same parameter shapes; else name the fault."""
    if len(other.blocks) != len(merged.blocks):
        raise FeatCalError(
            f"the {other.role} has {len(other.blocks)} blocks but the merged model has {len(merged.blocks)}"
        )
    for index, (mb, ob) in enumerate(zip(merged.blocks, other.blocks)):
        mine, theirs = calibrated_modules(mb), calibrated_modules(ob)
        if list(mine) != list(theirs):
            missing = sorted(set(mine) - set(theirs))
            extra = sorted(set(theirs) - set(mine))
            raise FeatCalError(
                f"block {index}: the {other.role} differs from the merged model: "
                f"modules missing there {missing}, modules only there {extra}"
            )
        for name, ref in mine.items():
            _check_module(index, name, ref, theirs[name], other.role)


def _check_module(index: int, name: str, ref: ModuleRef, other: ModuleRef, role: str) -> None:
    if other.kind != ref.kind:
        raise FeatCalError(
            f"block {index}, module {name!r}: a {ref.kind} in the merged model but a "
            f"{other.kind} in the {role}"
        )
    mine, theirs = ref.parameter_shapes(), other.parameter_shapes()
    for param in ("weight", "bias"):
        if mine.get(param) != theirs.get(param):
            raise FeatCalError(
                f"block {index}, module {name!r}: {param} has shape {theirs.get(param)} in the "
                f"{role} but {mine.get(param)} in the merged model"
            )


def _as_model(model: ModelLike, role: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise FeatCalError(f"the {role} must be a torch module or a checkpoint path, got {type(model).__name__}")


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _on_device(module: nn.Module, device: torch.device):
    """Move `module` to `device` for the duration, then back where it was."""
    home = _device_of(module)
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


class _WarningCollector(logging.Handler):
    """Keeps the featcal warnings of a run for its report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
