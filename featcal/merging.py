"""Merging experts into one model: Task Arithmetic and TIES, on state dicts, modules or checkpoints.

Task vectors tau_t = theta_t - theta_base, over floating-point tensors (others are copied from
the base), each expert with a weight w_t (default 1). Arithmetic runs in float32 (float64 for
float64 tensors) and is cast back to the base's dtype.

- Task Arithmetic: theta = theta_base + scaling * sum_t w_t tau_t.
- TIES (Yadav et al., 2023): trim each tau_t to its `density` fraction of largest magnitudes;
  d_t = w_t trim(tau_t); elect per entry the sign s = +1 where sum_t d_t >= 0, else -1; keep
  the d_t of that sign: theta = theta_base + scaling * sum_t d_t [agree] / sum_t w_t [agree]
  (divided by 1 where no task agrees). With unit weights that is the mean of the agreeing
  trimmed entries. The trim is either
  - "global": over all of tau_t's entries at once, ceil(density * count) kept (the TIES paper;
    FusionBench also trims the whole flattened task vector, with its own rounding, zero-sign
    rule and default sum at scaling 0.3); a checkpoint merge finds that threshold exactly in two
    reads of the models, by histograms of the magnitudes' bit patterns, never holding a whole
    task vector; or
  - "per-tensor": in each tensor separately, max(1, floor(density * numel)) kept (mergekit's
    `ties`, whose `weight`, `density`, `lambda` and `normalize: true` are w_t, density, scaling).

Every expert tensor (and the base's) must be finite: a NaN or infinite entry is refused, naming
the task and tensor, instead of being merged into every model that uses it.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import FeatCalError
from .io.checkpoint import copy_companions
from .io.lazy_checkpoint import LazyCheckpoint
from .io.sharded_writer import ShardedWriter
from .ops import accumulator_dtype

StateLike = nn.Module | Mapping[str, Tensor]
METHODS = ("ta", "ties")
TRIMS = ("global", "per-tensor")


@dataclass(frozen=True)
class MergeRecipe:
    """How to merge: `method` "ta" or "ties", the task vectors' `scaling`, TIES' `density` and
    `trim` ("global" or "per-tensor"), and per-task `weights` (a task absent from it weighs 1)."""

    method: str = "ta"
    scaling: float = 0.3
    density: float = 0.2
    trim: str = "global"
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FeatCalError(f"merge method must be one of {list(METHODS)}, got {self.method!r}")
        if self.trim not in TRIMS:
            raise FeatCalError(f"TIES trim must be one of {list(TRIMS)}, got {self.trim!r}")
        if not 0 < self.density <= 1:
            raise FeatCalError(f"density must be in (0, 1], got {self.density}")
        for task, weight in self.weights.items():
            if not math.isfinite(weight):
                raise FeatCalError(f"expert {task!r}: its weight must be a finite number, got {weight}")

    def weight(self, task: str) -> float:
        return self.weights.get(task, 1.0)


def task_arithmetic(
    base: StateLike,
    experts: Mapping[str, StateLike],
    scaling: float = 0.3,
    weights: Mapping[str, float] | None = None,
):
    """theta_base + scaling * sum_t w_t (theta_t - theta_base); returns the base's type."""
    return merge_states(base, experts, MergeRecipe("ta", scaling, weights=weights or {}))


def ties_merging(
    base: StateLike,
    experts: Mapping[str, StateLike],
    scaling: float = 1.0,
    density: float = 0.2,
    trim: str = "global",
    weights: Mapping[str, float] | None = None,
):
    """TIES merging (trim to `density`, elect sign, disjoint weighted mean); returns the base's type."""
    return merge_states(base, experts, MergeRecipe("ties", scaling, density, trim, weights or {}))


def merge_checkpoints(
    base: str | os.PathLike,
    experts: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    recipe: MergeRecipe,
    group_bytes: int = 2**30,
) -> None:
    """Merge safetensors checkpoint directories into the directory `out`, a group of tensors at a
    time: about `group_bytes` of the base and of one expert for Task Arithmetic, `group_bytes` in
    all over the base and every expert for TIES (in float32: twice that for 16-bit models). The
    same arithmetic as on state dicts, so the same result. Copies the base's config and companions."""
    if not experts:
        raise FeatCalError("no experts to merge")
    source = _Checkpoint(LazyCheckpoint(base), "the base model")
    tasks = {task: _Checkpoint(LazyCheckpoint(path), f"expert {task!r}") for task, path in experts.items()}
    share = 1 if recipe.method == "ta" else len(tasks) + 1
    groups = _groups(source.checkpoint, group_bytes // share)
    thresholds = _global_thresholds(source, tasks, groups, recipe)
    writer = ShardedWriter(out, len(groups))
    for number, keys in enumerate(groups):
        writer.write_shard(number, _merge_group(source, tasks, keys, recipe, thresholds))
    writer.finish()
    copy_companions(base, out, config=True)


class _Checkpoint:
    """Tensors by key from a LazyCheckpoint or a state dict, checked finite the first time they
    are read (the global trim reads every tensor again for its threshold)."""

    def __init__(self, checkpoint: LazyCheckpoint | Mapping[str, Tensor], role: str) -> None:
        self.checkpoint, self.role = checkpoint, role
        self.finite: set[str] = set()  # keys already checked

    def __contains__(self, key: str) -> bool:
        return key in self.checkpoint

    def keys(self) -> list[str]:
        return list(self.checkpoint.keys())

    def dtype(self, key: str) -> torch.dtype:
        if isinstance(self.checkpoint, LazyCheckpoint):
            return self.checkpoint.dtype(key)
        return self.checkpoint[key].dtype

    def read(self, keys: list[str]) -> dict[str, Tensor]:
        if isinstance(self.checkpoint, LazyCheckpoint):
            tensors = self.checkpoint.read(keys)
        else:
            tensors = {k: self.checkpoint[k] for k in keys}
        for key, value in tensors.items():
            if key in self.finite or not value.is_floating_point():
                continue
            if not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise FeatCalError(
                    f"{self.role}: tensor {key!r} holds {bad} NaN or infinite values; refusing to merge it"
                )
            self.finite.add(key)
        return tensors


def merge_states(base: StateLike, experts: Mapping[str, StateLike], recipe: MergeRecipe):
    """Merge modules or state dicts by `recipe`; returns the base's type (module or dict)."""
    if not experts:
        raise FeatCalError("no experts to merge")
    as_sd = lambda m: m.state_dict() if isinstance(m, nn.Module) else m  # noqa: E731
    source = _Checkpoint(as_sd(base), "the base model")
    tasks = {task: _Checkpoint(as_sd(m), f"expert {task!r}") for task, m in experts.items()}
    groups = [source.keys()]
    merged = _merge_group(source, tasks, groups[0], recipe, _global_thresholds(source, tasks, groups, recipe))
    return _like(base, merged)


def _groups(checkpoint: LazyCheckpoint, group_bytes: int) -> list[list[str]]:
    """The checkpoint's keys in groups of about `group_bytes`."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in checkpoint.keys():
        if groups[-1] and size + checkpoint.nbytes([key]) > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += checkpoint.nbytes([key])
    return groups


def _expert_vectors(base_sd: Mapping[str, Tensor], keys: list[str], checkpoint: _Checkpoint, task: str):
    """{key: tau} of one expert for the floating tensors `keys` of the base's `base_sd`."""
    expert_sd = checkpoint.read([k for k in keys if k in checkpoint])
    return {k: _task_vector(k, base_sd[k], expert_sd, task) for k in keys}


def _merge_group(
    source: _Checkpoint,
    tasks: Mapping[str, _Checkpoint],
    keys: list[str],
    recipe: MergeRecipe,
    thresholds: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """The merged tensors `keys`. Task Arithmetic reads one expert at a time; TIES holds every
    expert's task vectors of the group (its groups are smaller by as much)."""
    base_sd = source.read(keys)
    floating = [k for k in keys if base_sd[k].is_floating_point()]
    acc = {k: base_sd[k].to(accumulator_dtype(base_sd[k].dtype), copy=True) for k in floating}
    if recipe.method == "ta":
        for task, checkpoint in tasks.items():
            taus = _expert_vectors(base_sd, floating, checkpoint, task)
            for key in floating:
                acc[key].add_(taus[key], alpha=recipe.scaling * recipe.weight(task))
            del taus
    else:
        taus = {task: _expert_vectors(base_sd, floating, c, task) for task, c in tasks.items()}
        for key in floating:
            mean = _disjoint_mean(recipe, {t: v[key] for t, v in taus.items()}, thresholds)
            acc[key].add_(mean, alpha=recipe.scaling)
    return {k: acc[k].to(base_sd[k].dtype) if k in acc else base_sd[k].clone() for k in keys}


def _disjoint_mean(
    recipe: MergeRecipe, taus: Mapping[str, Tensor], thresholds: Mapping[str, Tensor]
) -> Tensor:
    """TIES on one tensor: sum_t d_t [agree] / sum_t w_t [agree], d_t = w_t trim(tau_t)."""
    trimmed = [
        _trim_per_tensor(tau, recipe.density) if recipe.trim == "per-tensor" else _trim(tau, thresholds[task])
        for task, tau in taus.items()
    ]
    weights = torch.tensor([recipe.weight(t) for t in taus], dtype=trimmed[0].dtype)
    weights = weights.view(-1, *([1] * trimmed[0].dim()))
    deltas = torch.stack(trimmed) * weights
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = deltas.sign() == sign
    divisor = (weights * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (deltas * agree).sum(0) / divisor


def _trim(tau: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(tau.abs() >= threshold.to(tau.dtype), tau, torch.zeros_like(tau))


def _trim_per_tensor(tau: Tensor, density: float) -> Tensor:
    """tau with all but its max(1, floor(density * numel)) largest magnitudes set to 0."""
    keep = max(1, int(density * tau.numel()))
    if keep >= tau.numel():
        return tau
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[torch.topk(tau.abs().flatten(), keep).indices] = True
    return torch.where(mask.view_as(tau), tau, torch.zeros_like(tau))


def _global_thresholds(
    source: _Checkpoint,
    tasks: Mapping[str, _Checkpoint],
    groups: list[list[str]],
    recipe: MergeRecipe,
) -> dict[str, Tensor]:
    """Per task, the magnitude of the k-th largest entry of its whole task vector, k =
    ceil(density * count): the global TIES trim's threshold (none for other recipes)."""
    if recipe.method != "ties" or recipe.trim != "global":
        return {}
    wide = any(source.dtype(key) == torch.float64 for keys in groups for key in keys)
    dtype = torch.float64 if wide else torch.float32

    def magnitudes() -> Iterable[dict[str, Tensor]]:
        """Per group and task, the magnitudes of the task's vector (one task's at a time)."""
        for keys in groups:
            base_sd = source.read(keys)
            floating = [k for k in keys if base_sd[k].is_floating_point()]
            for task, checkpoint in tasks.items():
                taus = _expert_vectors(base_sd, floating, checkpoint, task)
                if taus:
                    yield {task: torch.cat([v.abs().flatten().to(dtype) for v in taus.values()])}

    return kth_largest(magnitudes, list(tasks), recipe.density, dtype)


def kth_largest(
    chunks: Callable[[], Iterable[dict[str, Tensor]]],
    tasks: list[str],
    density: float,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Per task, the k-th largest of the non-negative values that `chunks()` yields for it over
    all its chunks, k = ceil(density * count), exactly, holding only 2^16 counters per task.

    Non-negative IEEE floats order as their bit patterns read as integers, so the value is found
    16 bits at a time: each pass over the chunks counts the next 16 bits of the values whose
    higher bits equal those found so far (2 passes for float32, 4 for float64)."""
    bits, as_int = (64, torch.int64) if dtype == torch.float64 else (32, torch.int32)
    counts, prefix, rank = dict.fromkeys(tasks, 0), dict.fromkeys(tasks, 0), dict.fromkeys(tasks, 0)
    for shift in range(bits - 16, -1, -16):
        hist = {t: torch.zeros(2**16, dtype=torch.int64) for t in tasks}
        for chunk in chunks():
            for task, values in chunk.items():
                ints = values.contiguous().view(as_int)
                if shift == bits - 16:
                    counts[task] += ints.numel()
                else:
                    ints = ints[(ints >> (shift + 16)) == prefix[task]]
                hist[task] += torch.bincount(((ints >> shift) & 0xFFFF).long(), minlength=2**16)
        for task in tasks:
            if shift == bits - 16:
                if counts[task] == 0:
                    raise FeatCalError(f"expert {task!r} has no floating-point tensors to merge")
                rank[task] = max(1, math.ceil(density * counts[task]))
            above = hist[task].flip(0).cumsum(0)  # values with a digit >= 65535 - i
            i = int(torch.searchsorted(above, rank[task]))
            rank[task] -= int(above[i - 1]) if i else 0
            prefix[task] = (prefix[task] << 16) | (2**16 - 1 - i)
    return {t: torch.tensor(prefix[t], dtype=as_int).view(dtype) for t in tasks}


def _task_vector(key: str, base: Tensor, expert_sd: Mapping[str, Tensor], task: str) -> Tensor:
    if key not in expert_sd:
        raise FeatCalError(f"expert {task!r} has no tensor {key!r}, which the base model has")
    value = expert_sd[key]
    if value.shape != base.shape:
        raise FeatCalError(
            f"expert {task!r}: tensor {key!r} has shape {tuple(value.shape)} but "
            f"{tuple(base.shape)} in the base model"
        )
    dtype = accumulator_dtype(base.dtype)
    return value.to(device=base.device, dtype=dtype) - base.to(dtype)


def _like(base: StateLike, state: dict[str, Tensor]):
    """A copy of the base module holding `state`, or `state` itself when the base is a dict."""
    if not isinstance(base, nn.Module):
        return state
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model
