"""The inputs of a stage's first block, for every batch of every task (docs/algorithm.md s.2).

The first stage's come from the calibration batches through each model's own front (embeddings,
up to the first block); a later stage's (T5's decoder) from the batches and the previous
stage's final streams: the calibrated student's for the merged model, each expert's own for
that expert.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import FeatCalConfig
from ..errors import FeatCalError, Location
from ..models.adapters import Batch, ModelAdapter
from ..models.capture import backbone_inputs, capture_first_block_inputs, token_weights
from ..models.sources import ModelSource
from .state import RunState, TaskState

log = logging.getLogger("featcal")


def capture_stage(
    stage: int,
    student: ModelSource,
    experts: dict[str, ModelSource],
    batches: dict[str, list],
    run: RunState,
    cfg: FeatCalConfig,
    device: torch.device,
    measures: Collection[str],
) -> dict[str, TaskState]:
    """Fresh task states holding the stage's block-0 inputs (the previous stage's, in `run`, are
    read and left to the caller to replace). `batches`: this process's batches of each task;
    `measures`: the tasks whose drift this process measures (on the first of its batches)."""
    adapter = student.stages[stage]
    stage_name = student.stage_name(stage)
    previous = run.tasks if stage > 0 else {}
    states = run.begin_stage(list(experts))
    inputs, heads = {}, {}
    for t in experts:
        prev = previous.get(t)
        if prev is None:
            inputs[t] = batches[t]
            if cfg.drift_examples != 0 and t in measures:
                heads[t] = head(batches[t][0], cfg.drift_examples)
        else:
            inputs[t] = _stage_batches(student, stage, batches[t], prev.student, device)
            if prev.drift is not None:
                first = head(batches[t][0], len(prev.drift))
                heads[t] = _stage_batches(student, stage, [first], [prev.drift], device)[0]
    with student.front(stage, device) as model:
        for t in tqdm(experts, desc="featcal: block inputs", disable=not cfg.progress):
            state = states[t]
            if isinstance(inputs[t][0], Mapping):
                _warn_dropped(adapter, t, inputs[t][0])
            for i, batch in enumerate(inputs[t]):
                where = Location(task=t, stage=stage_name, batch=i)
                hidden, ctx = capture_first_block_inputs(adapter, model, batch, device)
                weights = token_weights(adapter, batch, hidden, where=where)
                memory_weights = token_weights(adapter, batch, hidden, memory=True, where=where)
                state.add_batch(hidden, ctx, weights, memory_weights)
            if t in heads:
                state.set_drift(*capture_first_block_inputs(adapter, model, heads[t], device))
    for t, source in experts.items():
        state, prev = states[t], previous.get(t)
        expert_inputs = batches[t]
        if prev is not None:
            expert_inputs = _stage_batches(source, stage, batches[t], prev.expert, device)
        with source.front(stage, device) as model:
            for i, batch in enumerate(expert_inputs):
                hidden, ctx = capture_first_block_inputs(adapter, model, batch, device)
                shape = state.student.shapes()[i]
                if tuple(hidden.shape) != tuple(shape):
                    raise FeatCalError(
                        f"{Location(task=t, stage=stage_name, batch=i)}: the expert's first block receives "
                        "hidden states "
                        f"of shape {tuple(hidden.shape)} but the merged model's of shape {tuple(shape)}"
                    )
                state.add_expert_batch(hidden, ctx)
    return states


def _stage_batches(source: ModelSource, stage: int, batches: list, hidden, device: torch.device) -> list:
    """The backbone inputs of a later stage: each task batch with the previous stage's output."""
    prev, current = source.stages[stage - 1], source.stages[stage]
    with source.front(stage - 1, device) as model:
        backbone = prev.backbone(model)
        return [
            current.encdec.stage_inputs(b, prev.encdec.stage_output(backbone, h))
            for b, h in zip(batches, hidden)
        ]


def examples(batch: Batch) -> int:
    """The number of examples in a batch."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    return next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0)


def head(batch: Batch, count: int | None) -> Batch:
    """The first `count` examples of a batch (all of them for None)."""
    size = examples(batch)
    if count is None or count >= size:
        return batch
    if isinstance(batch, Tensor):
        return batch[:count]
    return {k: v[:count] if isinstance(v, Tensor) and v.shape[:1] == (size,) else v for k, v in batch.items()}


def _warn_dropped(adapter: ModelAdapter, task: str, batch: Mapping) -> None:
    _, dropped = backbone_inputs(adapter, batch)
    dropped = [key for key in dropped if key not in adapter.encdec.batch_keys]
    if dropped:
        message = "%s: batch keys %s are not inputs of the %s backbone and are ignored"
        log.warning(message, Location(task=task), dropped, adapter.name)
