"""Merging experts into one model: Task Arithmetic and TIES, on state dicts or modules.

Task vectors tau_t = theta_t - theta_base, over floating-point tensors (others are copied
from the base). Arithmetic runs in float32 (float64 for float64 tensors) and is cast back.

- Task Arithmetic: theta = theta_base + scaling * sum_t tau_t.
- TIES (Yadav et al., 2023): trim each tau_t to its `density` fraction of largest magnitudes
  (over all its entries), elect per entry the sign of sum_t trimmed tau_t, average the trimmed
  entries that agree with that sign: theta = theta_base + scaling * mean.

`task_arithmetic_checkpoints` computes Task Arithmetic over safetensors checkpoint directories
a group of tensors at a time, so that no model is ever whole in memory.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .errors import FeatCalError
from .io.checkpoint import copy_companions
from .io.lazy_checkpoint import LazyCheckpoint
from .io.sharded_writer import ShardedWriter
from .ops import accumulator_dtype

StateLike = nn.Module | Mapping[str, Tensor]


def task_arithmetic(base: StateLike, experts: Mapping[str, StateLike], scaling: float = 0.3):
    """theta_base + scaling * sum_t (theta_t - theta_base); returns the base's type (module or dict)."""
    base_sd, expert_sds = _state_dicts(base, experts)
    merged = {}
    for key, b in base_sd.items():
        if not b.is_floating_point():
            merged[key] = b.clone()
            continue
        acc = b.to(accumulator_dtype(b.dtype), copy=True)
        for task, sd in expert_sds.items():
            acc.add_(_task_vector(key, b, sd, task), alpha=scaling)
        merged[key] = acc.to(b.dtype)
    return _like(base, merged)


def task_arithmetic_checkpoints(
    base: str | os.PathLike,
    experts: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    scaling: float = 0.3,
    group_bytes: int = 2**30,
) -> None:
    """`task_arithmetic` over safetensors checkpoint directories into the directory `out`, holding
    one group of tensors (about `group_bytes` of the base) of the base and of one expert at a
    time; the same arithmetic, so the same result. Copies the base's config and companion files."""
    if not experts:
        raise FeatCalError("no experts to merge")
    source = LazyCheckpoint(base)
    tasks = {task: LazyCheckpoint(path) for task, path in experts.items()}
    groups: list[list[str]] = [[]]
    size = 0
    for key in source.keys():
        if groups[-1] and size + source.nbytes([key]) > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += source.nbytes([key])
    writer = ShardedWriter(out, len(groups))
    for number, keys in enumerate(groups):
        base_sd = source.read(keys)
        floating = [k for k in keys if base_sd[k].is_floating_point()]
        merged = {k: base_sd[k].to(accumulator_dtype(base_sd[k].dtype), copy=True) for k in floating}
        for task, checkpoint in tasks.items():
            expert_sd = checkpoint.read([k for k in floating if k in checkpoint])
            for key in floating:
                merged[key].add_(_task_vector(key, base_sd[key], expert_sd, task), alpha=scaling)
            del expert_sd
        base_sd.update({k: merged[k].to(base_sd[k].dtype) for k in floating})
        writer.write_shard(number, base_sd)
    writer.finish()
    copy_companions(base, out, config=True)


def ties_merging(
    base: StateLike,
    experts: Mapping[str, StateLike],
    scaling: float = 1.0,
    density: float = 0.2,
):
    """TIES merging (trim to `density`, elect sign, disjoint mean); returns the base's type."""
    if not 0 < density <= 1:
        raise FeatCalError(f"density must be in (0, 1], got {density}")
    base_sd, expert_sds = _state_dicts(base, experts)
    keys = [k for k, v in base_sd.items() if v.is_floating_point()]
    thresholds = {
        task: _magnitude_threshold([_task_vector(k, base_sd[k], sd, task) for k in keys], density)
        for task, sd in expert_sds.items()
    }
    merged = {k: v.clone() for k, v in base_sd.items() if not v.is_floating_point()}
    for key in keys:
        b = base_sd[key]
        taus = torch.stack(
            [_trim(_task_vector(key, b, sd, task), thresholds[task]) for task, sd in expert_sds.items()]
        )
        sign = taus.sum(0).sign()
        agree = (taus.sign() == sign) & (taus != 0)
        mean = (taus * agree).sum(0) / agree.sum(0).clamp_min(1)
        merged[key] = (b.to(mean.dtype) + scaling * mean).to(b.dtype)
    return _like(base, {k: merged[k] for k in base_sd})


def _magnitude_threshold(taus: list[Tensor], density: float) -> float:
    """The magnitude of the k-th largest entry over all tensors, k = ceil(density * count)."""
    magnitudes = torch.cat([t.abs().flatten() for t in taus])
    keep = max(1, math.ceil(density * magnitudes.numel()))
    return float(torch.kthvalue(magnitudes, magnitudes.numel() - keep + 1).values)


def _trim(tau: Tensor, threshold: float) -> Tensor:
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


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


def _state_dicts(base: StateLike, experts: Mapping[str, StateLike]):
    if not experts:
        raise FeatCalError("no experts to merge")
    as_sd = lambda m: m.state_dict() if isinstance(m, nn.Module) else m  # noqa: E731
    return as_sd(base), {task: as_sd(m) for task, m in experts.items()}


def _like(base: StateLike, state: dict[str, Tensor]):
    """A copy of the base module holding `state`, or `state` itself when the base is a dict."""
    if not isinstance(base, nn.Module):
        return state
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model
