"""The forward-order driver: `calibrate` re-solves the merged model block by block (docs/algorithm.md s.2).

    for each stage (T5: encoder, then decoder):
        capture the block-0 inputs of every task (student and expert streams)
        for each block:
            discover the module groups
            for each step of the block (one, unless sequential statistics split it):
                for each task:  accumulate -> reduce -> fold   (one task's sums alive at a time),
                                then (first step) measure the merged model's drift
                solve the step's groups and write them into the block
            for each task:  propagate, measure the calibrated drift
            write the block into the partial output (and maybe a stream snapshot), record it

A resumed run (docs/algorithm.md s.11) restores the streams from a snapshot, or replays the
blocks an earlier run finished forward only, and goes on. The phases are the functions of
`featcal.pipeline.phases`; the streams between them are owned by a `RunState`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import ops
from ..config import FeatCalConfig
from ..errors import DamagedOutputError, FeatCalError, Location, add_note
from ..io.block_files import ModuleOutput
from ..io.checkpoint import resolve
from ..io.data_files import CalibrationData
from ..io.model_card import append_featcal_section
from ..io.output_checkpoint import OutputCheckpoint
from ..models.capture import capture_first_block_inputs
from ..models.modules import LINEAR, unknown_norms
from ..models.sources import ModelLike, ModelSource, device_of, open_source
from ..sizes import parse_bytes
from .checks import check_architecture, check_batches, check_device, check_inputs, check_tasks
from .distributed import Collectives, DistributedError, open_collectives, process_device
from .fingerprint import LOCAL_SETTINGS, first_difference, input_fingerprint, run_fingerprint, source_digest
from .memory_plan import MemoryPlan, choose_placement, estimate
from .partial_output import Manifest, PartialOutput, inspect
from .phases import (
    BlockRun,
    accumulate,
    discover,
    drift,
    fold,
    later_contexts,
    measure_calibrated,
    measure_merged,
    new_sums,
    propagate,
    reduce,
    replay_expert,
    solve,
)
from .plan import BlockPlan
from .report import (
    IN_MEMORY_DATA,
    IN_MEMORY_MODULE,
    BlockReport,
    CalibrationReport,
    DistributedReport,
    InputsReport,
    StepReport,
    TaskData,
    peak_cpu_rss_bytes,
)
from .solver import BlockSystem
from .stage_inputs import capture_stage, examples
from .state import RunState, TaskState
from .stream_snapshot import SnapshotPolicy, read_snapshot, write_snapshot
from .work import WorkPlan, solve_owners, split_work

log = logging.getLogger("featcal")

DRIFT_RISE = 0.01  # a block's calibrated drift above its merged drift by this fraction is warned about


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
    resume: bool = False,
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
    directory (needed for a merged checkpoint; for a module, it is also saved there), renamed
    into place when complete; `overwrite` replaces an existing one.

    Until then the finished blocks are kept in `out`.featcal-partial with a manifest, which an
    interrupted run (an error, a signal, a kill) leaves behind; `resume` goes on from it (the
    result is bit-identical to an uninterrupted run's) after checking that the data, settings,
    models and featcal version are the ones it was made with; `overwrite` discards it. A run
    given neither refuses to start while one is there.

    Inside an initialised torch.distributed process group (config.distributed), every process
    calls this with the same arguments: the work is spread over them, process 0 alone writes
    `out`, and every process returns the same calibrated model. device "cuda" then means each
    process's LOCAL_RANK GPU.
    """
    cfg = config or FeatCalConfig()
    comm = open_collectives(cfg.distributed, cfg.distributed_timeout)
    try:
        return _calibrate(merged, base, experts, data, cfg, device, out, overwrite, resume, comm)
    finally:
        comm.close()


def _calibrate(
    merged: ModelLike,
    base: ModelLike,
    experts: Mapping[str, ModelLike],
    data: Mapping[str, Iterable],
    cfg: FeatCalConfig,
    device: str | torch.device | None,
    out: str | os.PathLike | None,
    overwrite: bool,
    resume: bool,
    comm: Collectives,
) -> Calibrated:
    if comm.rank != 0:
        cfg = replace(cfg, progress=False)
    writes = out is not None and comm.rank == 0
    with comm.step("checking the inputs"):
        device = check_device(device)
        tasks = check_tasks(experts, data)
        streamed = not isinstance(merged, nn.Module)
        if streamed and out is None:
            raise FeatCalError(
                "the merged model is a checkpoint path: give out= (--out), the directory that "
                "receives the calibrated blocks as they are done"
            )
        if resume and out is None:
            raise FeatCalError("resume=True goes on from the partial output of out=: give out=")
        previous = inspect(out, overwrite, resume) if writes else None
        student = open_source(merged, "merged model")
        if streamed and student.lazy is None:
            raise FeatCalError(f"the merged model {merged} must be a local directory of safetensors files")
        base_src = open_source(base, "base model", student.dtype)
        check_architecture(student, base_src)
        batches = {t: check_batches(t, data[t]) for t in tasks}
        for t in tasks:
            check_inputs(student, t, batches[t])
        inputs = _describe_inputs(merged, base, experts, data, batches)
        if device is None:
            device = torch.device("cpu") if streamed else device_of(student.model)
        device = process_device(device, comm)
        fingerprint = run_fingerprint(cfg, batches, student, base_src) if comm.world > 1 else None
    _check_agreement(comm.check("comparing the inputs of the processes", fingerprint), comm)

    partial = None
    try:
        with comm.step("probing the batch sizes"):
            sizes, context = _batch_sizes(student, batches, device)
            work = split_work({t: [n * k for n, k, _ in sizes[t]] for t in tasks}, comm.world)
            mine = work.batches[comm.rank]
            expert_srcs = {t: open_source(experts[t], f"expert {t!r}", student.dtype) for t in mine}
            for source in expert_srcs.values():
                check_architecture(student, source)
        comm.set_work(work)  # a collective: after the check, so every process makes its groups
        local = {t: [batches[t][i] for i in mine[t]] for t in mine}
        measures = {t for t in mine if work.leader(t) == comm.rank}  # the leader holds batch 0
        partial = _open_partial(
            out, resume, previous, cfg, batches, student, base_src, expert_srcs, device, comm
        )
        kept = comm.check("reading the partial output", partial.manifest.finished if partial else [])[0]
        finished = [BlockReport.from_dict(b) for b in kept]
        with comm.guard():  # process 0's writes
            output = None
            if partial is not None:
                output = (
                    OutputCheckpoint(student.lazy, student.blocks, partial.path, len(finished))
                    if streamed
                    else ModuleOutput(student.model, student.blocks, partial.path)
                )
            written = _Output(output, partial, finished)
            report = _run(
                student,
                base_src,
                expert_srcs,
                local,
                measures,
                work,
                sizes,
                context,
                cfg,
                device,
                written,
                inputs,
                comm,
            )
            with comm.step("writing the output"):
                if partial is not None:
                    output.finish()
                    append_featcal_section(partial.path, report, output.card_source)
                    report.write_json(partial.path / "featcal_report.json")
                    partial.complete()
        comm.check("renaming the output")  # every process returns once the output is in place
    except BaseException as err:
        _keep_or_discard(err, partial, out, previous)
        raise
    return Calibrated(Path(out) if streamed else merged, report)


def _keep_or_discard(
    err: BaseException, partial: PartialOutput | None, out, previous: Manifest | None
) -> None:
    """After a run stopped: a partial output without a finished block is discarded; one with
    some is kept, and the error says how to resume (not when it is damaged, or when the run was
    refused before it took the partial output over)."""
    if partial is None and previous is not None and isinstance(err, KeyboardInterrupt):
        partial = PartialOutput(Path(out), previous)  # stopped before taking it over
    if partial is None or not partial.path.exists() or isinstance(err, DamagedOutputError):
        return
    if partial.finished == 0:
        partial.discard()  # nothing worth resuming
    else:
        add_note(err, partial.note())


def _open_partial(
    out: str | os.PathLike | None,
    resume: bool,
    previous: Manifest | None,
    cfg: FeatCalConfig,
    batches: dict[str, list],
    student: ModelSource,
    base: ModelSource,
    experts: dict[str, ModelSource],
    device: torch.device,
    comm: Collectives,
) -> PartialOutput | None:
    """Process 0's partial output of `out` (None elsewhere, and without `out`): begun afresh, or
    taken over from `previous` when it was made from the same inputs."""
    if out is None:
        return None
    digests: dict[str, str] = {}
    with comm.guard():
        digests = {t: source_digest(s) for t, s in experts.items()}
    digests = {t: d for mine in comm.check("fingerprinting the experts", digests) for t, d in mine.items()}
    partial = None
    with comm.step("opening the partial output"):
        if comm.rank == 0:
            from .. import __version__

            manifest = Manifest(
                featcal_version=__version__,
                settings={k: v for k, v in cfg.to_dict().items() if k not in LOCAL_SETTINGS},
                tasks=list(batches),
                inputs=input_fingerprint(batches, student, base, digests),
                blocks_per_stage=[len(blocks) for blocks in student.blocks],
                numerics={
                    "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
                    "torch": torch.__version__,
                    "backends": ops.backend_info(),
                },
            )
            partial = PartialOutput.start(out, manifest, previous)
            if resume and previous is None:
                log.warning(
                    "nothing to resume from (no finished block in %s): the run starts afresh", partial.path
                )
    return partial


def _check_agreement(fingerprints: list, comm: Collectives) -> None:
    """Every process must have been given the same inputs as process 0."""
    for rank, theirs in enumerate(fingerprints[1:], start=1):
        part = first_difference(fingerprints[0], theirs)
        if part is not None:
            raise DistributedError(
                f"rank {rank} of {comm.world} was given other {part} than rank 0: every process of a "
                "run must be given the same data, settings and models",
                rank=comm.rank,
            )


def _run(
    student: ModelSource,
    base: ModelSource,
    experts: dict[str, ModelSource],
    batches: dict[str, list],
    measures: set[str],
    work: WorkPlan,
    sizes: dict[str, list[tuple[int, int, int]]],
    context: int,
    cfg: FeatCalConfig,
    device: torch.device,
    written: _Output,
    inputs: InputsReport,
    comm: Collectives,
) -> CalibrationReport:
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.init()  # the allocator's statistics exist only once CUDA is initialised
        torch.cuda.reset_peak_memory_stats(device)
    in_memory = [s.model for s in (student, base, *experts.values()) if s.lazy is None]
    training = {id(m): m.training for m in in_memory}
    collector = _WarningCollector()
    logger = logging.getLogger("featcal")
    logger.addHandler(collector)
    quiet = comm.rank != 0 and logger.propagate  # other processes' warnings go to rank 0's report
    if quiet:
        logger.propagate = False
    state: RunState | None = None
    try:
        with comm.step("planning memory"):
            for m in in_memory:
                m.eval()
            if student.lazy is None:
                student.model.to(device)
            if comm.rank == 0:
                _warn_unknown_norms(student)
            local_sizes = {t: [sizes[t][i] for i in work.batches[comm.rank][t]] for t in batches}
            plan = _plan(student, local_sizes, context, cfg, device)
            state = RunState(plan.placement, device, cfg.offload_dir)
        plans = comm.check("planning memory", plan.to_dict())
        if cfg.progress:
            print(_describe_plans(plans), file=sys.stderr)
        blocks = list(written.finished)
        done, total = len(blocks), sum(len(b) for b in student.blocks)
        resumed_from = _resumed_from(student, done) if done else None
        snapshots = _takes_snapshots(student, written, comm)
        policy, restored = SnapshotPolicy(), 0  # restored: blocks whose streams a snapshot gave
        bar = tqdm(total=total, initial=done, desc="featcal: blocks", disable=not cfg.progress)

        def capture(stage: int) -> None:
            with comm.step(f"capturing the {student.stage_name(stage) or 'first'} block inputs"):
                state.end_stage(capture_stage(stage, student, experts, batches, state, cfg, device, measures))

        for stage in range(len(student.stages)):
            if stage == 0 or done < total:  # else every block is finished: stage 0 gave the token counts
                capture(stage)
                # tokens: padding included (they size the statistics); real: the non-padding ones
                counts = comm.check(
                    "counting tokens",
                    (
                        {t: s.tokens for t, s in state.tasks.items()},
                        {t: _real_tokens(s) for t, s in state.tasks.items()},
                    ),
                )
                tokens = _sum_counts([padded for padded, _ in counts])
                real = _sum_counts([mine for _, mine in counts])
            if stage == 0:
                tasks_info = {
                    t: {
                        "batches": len(work.tokens[t]),
                        "tokens": real[t],
                        "padding_tokens": tokens[t] - real[t],
                    }
                    for t in work.tokens
                }
                if snapshots and written.partial.manifest.snapshot is not None and done < total:
                    restored = _restore_streams(written.partial, state, resumed_from, lambda: capture(0))
            for index in range(len(student.blocks[stage])):
                block_started = time.perf_counter()
                flat = sum(len(b) for b in student.blocks[:stage]) + index
                finished = flat < done
                if finished and (done == total or flat < restored):
                    if student.lazy is None:  # the returned module gets every calibrated block
                        with student.block(stage, index, device) as block:
                            _restore_block(
                                student.where(stage, index), stage, index, block, written.store, comm
                            )
                    continue
                with student.block(stage, index, device) as block:
                    run = _block_run(student, stage, index, block, cfg, device)
                    if finished:
                        _replay_block(run, stage, block, experts, state, written.store, comm)
                    else:
                        report = _calibrate_block(run, stage, block, base, experts, state, tokens, comm)
                        report.index, report.seconds = len(blocks), time.perf_counter() - block_started
                        with comm.guard():
                            if written.partial is not None:
                                written.store.write(stage, index, block)
                                due = snapshots and flat + 1 < total and policy.due()
                                snapshot = (
                                    _snapshot(written.partial, flat + 1, state, policy) if due else None
                                )
                                written.partial.record(asdict(report), str(run.where), snapshot)
                        comm.check(f"writing {run.where}")
                del block  # a block read from disk is freed before the next one is read
                if finished:
                    resumed_from["replay_seconds"] += time.perf_counter() - block_started
                    continue
                blocks.append(report)
                bar.update()
                if report.drift_calibrated is not None:
                    bar.set_postfix(drift=f"{report.drift_merged:.3f}->{report.drift_calibrated:.3f}")
        bar.close()
        if comm.rank == 0:
            _warn_drift_raised(blocks)
    finally:
        logger.removeHandler(collector)
        if quiet:
            logger.propagate = True
        if state is not None:
            state.close()
        for m in in_memory:
            m.train(training[id(m)])

    ranks = comm.check("reporting", (collector.messages, comm.seconds, comm.seconds_by_phase))
    distributed = None
    if comm.world > 1:
        distributed = DistributedReport(
            world_size=comm.world,
            backend=comm.backend,
            ranks=[
                {
                    **work.summary(r),
                    "communication_seconds": seconds,
                    "communication_seconds_by_phase": by_phase,
                    "memory_plan": plans[r],
                }
                for r, (_, seconds, by_phase) in enumerate(ranks)
            ],
        )
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
        warnings=_merge_warnings([messages for messages, _, _ in ranks]),
        distributed=distributed,
        resumed_from=resumed_from,
        snapshot_seconds=policy.seconds,
        inputs=inputs,
    )


class _Output(NamedTuple):
    """Where process 0 puts each finished block (None elsewhere, and without an output
    directory), and the reports of the blocks a resumed run keeps."""

    store: OutputCheckpoint | ModuleOutput | None
    partial: PartialOutput | None
    finished: list[BlockReport]


def _takes_snapshots(student: ModelSource, written: _Output, comm: Collectives) -> bool:
    """Whether this run keeps stream snapshots in its partial output (see stream_snapshot.py)."""
    one_stage = len(student.stages) == 1 and student.adapter.encdec.later_arguments is None
    return written.partial is not None and comm.world == 1 and one_stage


def _restore_streams(partial: PartialOutput, state: RunState, resumed_from: dict, capture) -> int:
    """The streams of the partial output's snapshot into `state`; the blocks finished when it was
    taken. A snapshot that cannot be read only costs replay: `capture` starts the stage again."""
    started, manifest = time.perf_counter(), partial.manifest
    try:
        read_snapshot(partial.path / manifest.snapshot, state)
    except FeatCalError as err:
        log.warning("%s; the finished blocks are replayed instead", err)
        capture()
        return 0
    resumed_from["restored_from_snapshot"] = manifest.snapshot_finished
    resumed_from["restore_seconds"] = time.perf_counter() - started
    return manifest.snapshot_finished


def _snapshot(partial: PartialOutput, finished: int, state: RunState, policy: SnapshotPolicy) -> str | None:
    """A stream snapshot after `finished` blocks, or None when it cannot be written: it only
    spares a resumed run some replay, so the run goes on without it."""
    started, name = time.perf_counter(), None
    try:
        name = write_snapshot(partial.path, finished, state)
    except (FeatCalError, OSError) as err:
        log.warning("no stream snapshot after %d blocks (a resumed run replays more): %s", finished, err)
    policy.taken(time.perf_counter() - started)
    return name


def _resumed_from(student: ModelSource, done: int) -> dict:
    """The report's `resumed_from`: the first block left to calibrate (None, None when every
    block was finished), the blocks kept, the seconds their replay took and, when the streams
    came from a snapshot, after how many blocks it was taken and the seconds reading it took."""
    stage, block = None, None
    left = done
    for k, blocks in enumerate(student.blocks):
        if left < len(blocks):
            stage, block = k, left
            break
        left -= len(blocks)
    name = None if stage is None else student.stage_name(stage)
    return {"stage": name, "block": block, "finished_before": done, "replay_seconds": 0.0}


def _block_run(
    student: ModelSource, stage: int, index: int, block: nn.Module, cfg: FeatCalConfig, device: torch.device
) -> BlockRun:
    return BlockRun(
        adapter=student.stages[stage],
        index=index,
        num_blocks=len(student.blocks[stage]),
        where=student.where(stage, index),
        config=cfg,
        dtype=ops.accumulator_dtype(next(block.parameters()).dtype),
        device=device,
    )


def _replay_block(
    run: BlockRun,
    stage: int,
    block: nn.Module,
    experts: dict[str, ModelSource],
    state: RunState,
    store: OutputCheckpoint | ModuleOutput | None,
    comm: Collectives,
) -> None:
    """A block an earlier run finished, forward only: each expert block on its stream, the
    merged `block` as given on the drift examples; then, its calibrated values restored, the
    block on the student streams."""
    with comm.guard():
        for task, s in state.tasks.items():
            with experts[task].block(stage, run.index, run.device) as expert_block:
                replay_expert(run, expert_block, s)
            if s.drift is not None:
                measure_merged(run, block, s)
    comm.check(f"replaying {run.where}")
    _restore_block(run.where, stage, run.index, block, store, comm)
    with comm.guard():
        for s in state.tasks.values():
            propagate(run, block, s)


def _restore_block(
    where: Location,
    stage: int,
    index: int,
    block: nn.Module,
    store: OutputCheckpoint | ModuleOutput | None,
    comm: Collectives,
) -> None:
    """A finished block's calibrated values into `block`: read by process 0 from the partial
    output, broadcast to the others."""
    with comm.guard():
        if store is not None:
            store.read_into(stage, index, block)
    comm.check(f"reading the finished {where}")
    params = [p.data for p in block.parameters()]
    comm.broadcast_from(0, params, f"sharing the finished {where} from rank 0")


def _calibrate_block(
    run: BlockRun,
    stage: int,
    block: nn.Module,
    base: ModelSource,
    experts: dict[str, ModelSource],
    state: RunState,
    tokens: dict[str, int],
    comm: Collectives,
) -> BlockReport:
    """The phases of one block, in order (see the module docstring), once per step of the block
    (one step unless config.sequential says otherwise, docs/algorithm.md s.12)."""
    index, cfg, device = run.index, run.config, run.device
    work = comm.work
    assert work is not None
    report = BlockReport(index=index, seconds=0.0, stage=run.where.stage)
    merged_hidden: dict[str, Tensor] = {}  # of the drift examples, through the block as given
    low_coverage: dict[str, int] = {}  # routed experts left merged (this process solved them)
    plan = steps = None
    if not state.tasks:  # this process has no work: it still takes part in the plan and the solves
        plan, _ = _shared_plan(run, block, None, None, comm)
        steps = _steps(run, plan)
    k = 0
    while steps is None or k < len(steps):
        step_started = time.perf_counter()
        system = None if steps is None else BlockSystem.zeros(steps[k], run.dtype, device)
        for task, s in state.tasks.items():
            with ExitStack() as held:
                expert_block = None  # an expert block that cannot be read here fails this process alone
                with comm.guard():
                    expert_block = held.enter_context(experts[task].block(stage, index, device))
                first = None
                if plan is None:
                    plan, first = _shared_plan(run, block, expert_block, s.inputs(), comm)
                    steps = _steps(run, plan)
                    system = BlockSystem.zeros(steps[0], run.dtype, device)
                step, last_step = steps[k], k == len(steps) - 1
                sums = new_sums(run, step, tokens[task])
                outputs = s.new_stream("expert") if last_step else None
                with comm.guard():
                    if comm.ok:
                        accumulate(
                            run, step, block, expert_block, s.inputs(), sums, outputs, task=task, first=first
                        )
                reduced = reduce(
                    sums, comm.task_all_reduce(task, f"reducing the sums of task {task!r}, {run.where}")
                )
                with comm.guard():
                    if comm.ok and work.leader(task) == comm.rank:
                        fold(run, system, reduced, expert_block, task)
                    if comm.ok and last_step:
                        s.advance_expert(
                            outputs, later_contexts(run, expert_block, s.expert, s.expert_ctx, s.home)
                        )
            del sums, reduced, expert_block, first
            with comm.guard():
                if comm.ok and k == 0 and s.drift is not None:
                    merged_hidden[task] = measure_merged(run, block, s)
        comm.check(f"accumulating {run.where}")
        step = steps[k]
        _solve_shared(run, stage, system, step, block, base, solve_owners(step, comm.world), comm)
        low_coverage.update(system.low_coverage)
        del system
        names = [n for g in step.groups for n in g.names]
        report.steps.append(StepReport(names, time.perf_counter() - step_started))
        k += 1

    last = index == run.num_blocks - 1 and run.adapter.encdec.next_stage is None
    merged_drift: dict[str, float] = {}
    calibrated_drift: dict[str, float] = {}
    with comm.guard():
        for task, s in state.tasks.items():
            if task in merged_hidden:
                merged_drift[task] = drift(merged_hidden[task], s.expert[0], s.weights[0])
            if not last:
                propagate(run, block, s)
            if s.drift is not None:
                calibrated_drift[task] = measure_calibrated(run, block, s, propagated=not last)
    gathered = comm.check(f"propagating {run.where}", (merged_drift, calibrated_drift, low_coverage))
    for _, _, low in gathered:
        report.low_coverage_experts.update(low)
    if cfg.drift_examples != 0:
        for task in work.tokens:
            report.drift_merged_per_task[task] = next(m[task] for m, _, _ in gathered if task in m)
            report.drift_calibrated_per_task[task] = next(c[task] for _, c, _ in gathered if task in c)
        report.drift_merged = _mean(report.drift_merged_per_task.values())
        report.drift_calibrated = _mean(report.drift_calibrated_per_task.values())
    return report


def _steps(run: BlockRun, plan: BlockPlan) -> list[BlockPlan]:
    """The plans of the block's steps: the whole plan, or (sequential statistics) each step's
    groups; a step of norms that are not calibrated is left out."""
    cfg = run.config
    steps = plan.steps(cfg.sequential, run.adapter.post_norm, run.adapter.inner_norm)
    if len(steps) == 1:
        return [plan]
    if not cfg.calibrate_layernorm:
        steps = [groups for groups in steps if any(plan.groups[g].kind == LINEAR for g in groups)]
    return [plan.only(groups) for groups in steps]


def _shared_plan(run: BlockRun, block: nn.Module, expert_block, inputs, comm: Collectives):
    """The block's plan: every process with work discovers it on its own first task (reusing that
    batch); all must find the plan of the first process with work, which a process without work
    rebuilds over its own block. Returns (plan, the first batch's expert run or None)."""
    plan = first = None
    with comm.guard():
        if expert_block is not None:
            plan, first = discover(run, block, expert_block, inputs)
    mine = None if plan is None or comm.world == 1 else plan.layout()
    layouts = comm.check(f"discovering the groups of {run.where}", mine)
    if comm.world > 1:
        source = next(r for r, layout in enumerate(layouts) if layout is not None)
        for rank, layout in enumerate(layouts):
            if layout is not None and layout != layouts[source]:
                raise DistributedError(
                    f"{run.where}: rank {rank} finds other module groups than rank {source} ({layout[0]} "
                    f"against {layouts[source][0]}): every process must run the same model code, whose "
                    "modules may not depend on the data",
                    rank=comm.rank,
                )
        if plan is None:
            plan = BlockPlan.from_layout(layouts[source], run.modules(block))
    else:
        source = 0
    if plan.skipped and comm.rank == source:
        log.warning("%s: modules %s are never called and keep their merged values", run.where, plan.skipped)
    return plan, first


def _solve_shared(
    run: BlockRun,
    stage: int,
    system: BlockSystem,
    plan: BlockPlan,
    block: nn.Module,
    base: ModelSource,
    owners: list[int],
    comm: Collectives,
) -> None:
    """Each group's system summed into its owner, solved there, and the new parameters copied
    from the owner into every process's block."""
    where = run.where
    owned: dict[int, list[int]] = {}  # owner -> its groups, owners in rank order
    for g, owner in sorted(enumerate(owners), key=lambda pair: pair[1]):
        owned.setdefault(owner, []).append(g)
    folded = system.tasks.clone()  # this process's count, sent to every owner
    for owner, groups in owned.items():
        tensors = [t for g in groups for t in system.groups[g].collective_tensors()]
        count = folded.clone()
        comm.reduce_to(owner, [*tensors, count], f"reducing the systems of {where} to rank {owner}")
        if owner == comm.rank:
            system.tasks.copy_(count)
    mine = owned.get(comm.rank, [])
    with comm.step(f"solving {where}"):
        if mine:
            with base.block(stage, run.index, run.device) as base_block:
                solve(run, system, plan, block, base_block, None if len(mine) == len(owners) else mine)
    for owner, groups in owned.items():
        params = _solved_tensors(plan, groups)
        comm.broadcast_from(owner, params, f"sharing the solved parameters of {where} from rank {owner}")


def _solved_tensors(plan: BlockPlan, groups: list[int]) -> list[Tensor]:
    """What solving `groups` writes, once each: a routed expert's slot of its fused parameter
    (other slots may be another owner's), or the module's parameters."""
    found: dict[object, list[Tensor]] = {}
    for g in groups:
        for ref in plan.groups[g].members:
            if ref.routed:
                found[ref.name] = [ref.weight().detach()]
            else:
                found.setdefault(id(ref.module), [p.data for p in ref.module.parameters(False)])
    return [t for tensors in found.values() for t in tensors]


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


def _warn_drift_raised(blocks: list[BlockReport]) -> None:
    """Warn when calibration raised the mean drift of a block by more than DRIFT_RISE: a sign of
    inputs that do not belong together, or of hyperparameters that do not suit the model. (A
    sound run may raise it by a hair: the solves minimise a ridge objective, not the drift.)"""
    raised = [
        b
        for b in blocks
        if b.drift_calibrated is not None and b.drift_calibrated > b.drift_merged * (1 + DRIFT_RISE)
    ]
    if not raised:
        return
    shown = ", ".join(f"block {b.index} {b.drift_merged:.4g} -> {b.drift_calibrated:.4g}" for b in raised[:4])
    more = f" and {len(raised) - 4} more" if len(raised) > 4 else ""
    log.warning(
        "calibration raised the mean drift (merged -> calibrated) by more than %g%% at %d of %d blocks: "
        "%s%s; is the merged model a merge of these experts (not one of the experts, or another model, "
        "given as the merge)? Else the hyperparameters (lambda_ratio, anchor_blend_rho, "
        "teacher_interp_alpha) may not suit this model, or the calibration data may be too few",
        100 * DRIFT_RISE,
        len(raised),
        len(blocks),
        shown,
        more,
    )


def _real_tokens(state: TaskState) -> int:
    """The non-padding tokens of a task's batches (a token weight of 0 marks padding)."""
    shapes = state.student.shapes()
    return sum(
        shape[0] * shape[1] if weights is None else int((weights != 0).sum())
        for shape, weights in zip(shapes, state.weights)
    )


def _describe_inputs(
    merged: ModelLike,
    base: ModelLike,
    experts: Mapping[str, ModelLike],
    data: Mapping[str, Iterable],
    batches: dict[str, list],
) -> InputsReport:
    """The report's `inputs`: where each model and each task's data came from."""
    from .. import __version__

    def data_source(task: str) -> str:
        loaded = isinstance(data[task], CalibrationData)
        return str(Path(data[task].path).resolve()) if loaded else IN_MEMORY_DATA

    return InputsReport(
        merged=_describe_model(merged),
        base=_describe_model(base),
        experts={t: _describe_model(m) for t, m in experts.items()},
        data={t: TaskData(data_source(t), sum(examples(b) for b in batches[t])) for t in batches},
        featcal_version=__version__,
        torch_version=torch.__version__,
    )


def _describe_model(model: ModelLike) -> str:
    """An absolute checkpoint path, a hub id, or "in-memory module"."""
    if isinstance(model, nn.Module):
        return IN_MEMORY_MODULE
    if not isinstance(model, (str, os.PathLike)):
        return f"a {type(model).__name__}"  # refused when the model is opened
    where = resolve(model)
    return str(where.resolve()) if isinstance(where, Path) else where


def _batch_sizes(
    student: ModelSource, batches: dict[str, list], device: torch.device
) -> tuple[dict[str, list[tuple[int, int, int]]], float]:
    """(examples, tokens per example (padding included), hidden width) of every batch of every
    task, from the adapter's sequence length or one probe of the merged model's front on the
    first batch; and the bytes of the captured block arguments per example."""
    first = next(iter(batches.values()))[0]
    with student.front(0, device) as model:
        hidden, ctx = capture_first_block_inputs(student.adapter, model, first, device)
    count, tokens, width = hidden.shape
    sizes = {}
    for task, task_batches in batches.items():
        lengths = [student.adapter.sequence_length(b) for b in task_batches]
        sizes[task] = [
            (examples(b), tokens if n is None else n, width) for b, n in zip(task_batches, lengths)
        ]
    return sizes, ctx.nbytes() / count


def _plan(
    student: ModelSource,
    sizes: dict[str, list[tuple[int, int, int]]],
    context_per_example: float,
    cfg: FeatCalConfig,
    device: torch.device,
) -> MemoryPlan:
    """The memory plan of this process, from the merged model's shapes and its batches' sizes."""
    flat = [size for task in sizes.values() for size in task]
    context = int(context_per_example * sum(n for n, _, _ in flat)) * 2
    plan = estimate(
        [b for stage in student.blocks for b in stage],
        max(student.block_bytes(k, i) for k, stage in enumerate(student.blocks) for i in range(len(stage))),
        student.dtype,
        ops.accumulator_dtype(student.dtype),
        flat,
        context,
        len(sizes),
        device,
        student.adapter.module_kind,
    )
    return choose_placement(
        plan, cfg.stream_placement, parse_bytes(cfg.max_gpu_memory), parse_bytes(cfg.max_cpu_memory)
    )


def _describe_plans(plans: list[dict]) -> str:
    """The memory plan of each process (one process: its plan as before)."""
    if len(plans) == 1:
        return MemoryPlan(**plans[0]).describe()
    return "\n".join(f"rank {r}: {MemoryPlan(**p).describe()}" for r, p in enumerate(plans))


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    """Per task, the sum over processes of their counts."""
    total: dict[str, int] = {}
    for mine in counts:
        for task, n in mine.items():
            total[task] = total.get(task, 0) + n
    return total


def _merge_warnings(per_rank: list[list[str]]) -> list[str]:
    """Every process's warnings, once each; those of other processes than 0 name their rank."""
    merged = list(per_rank[0])
    for rank, messages in enumerate(per_rank[1:], start=1):
        merged += [f"rank {rank}: {m}" for m in dict.fromkeys(messages) if m not in merged]
    return merged


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
