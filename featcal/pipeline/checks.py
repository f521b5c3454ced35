"""Checks of a run's inputs before any work: the tasks, their batches, and that every model has
the merged model's architecture. Each error names the task, stage, block and module at fault."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

from ..errors import FeatCalError, Location
from ..models.modules import ModuleRef, calibrated_modules
from ..models.sources import ModelSource


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


def check_batches(task: str, batches: Iterable) -> list:
    """A task's batches as a list; an error naming the task and batch if one is not a batch."""
    batches = list(batches)
    if not batches:
        raise FeatCalError(f"{Location(task=task)} has no calibration data: its batch iterable is empty")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (Tensor, Mapping)):
            raise FeatCalError(
                f"{Location(task=task)}: batch {i} is a {type(batch).__name__}; a batch must be a "
                "tensor or a dict of tensors"
            )
    return batches


def check_architecture(merged: ModelSource, other: ModelSource) -> None:
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
        kind_of = merged.stages[stage].module_kind
        for index, (mb, ob) in enumerate(zip(mine, theirs)):
            _check_block(
                merged.where(stage, index),
                calibrated_modules(mb, kind_of),
                calibrated_modules(ob, kind_of),
                other.role,
            )


def _check_block(
    where: Location, mine: dict[str, ModuleRef], theirs: dict[str, ModuleRef], role: str
) -> None:
    if list(mine) != list(theirs):
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        raise FeatCalError(
            f"{where}: the {role} differs from the merged model: "
            f"modules missing there {missing}, modules only there {extra}"
        )
    for name, ref in mine.items():
        _check_module(where.at(module=name), ref, theirs[name], role)


def _check_module(where: Location, ref: ModuleRef, other: ModuleRef, role: str) -> None:
    if other.kind != ref.kind:
        raise FeatCalError(f"{where}: a {ref.kind} in the merged model but a {other.kind} in the {role}")
    mine, theirs = ref.parameter_shapes(), other.parameter_shapes()
    for param in ("weight", "bias"):
        if mine.get(param) != theirs.get(param):
            raise FeatCalError(
                f"{where}: {param} has shape {theirs.get(param)} in the "
                f"{role} but {mine.get(param)} in the merged model"
            )
