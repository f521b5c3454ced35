"""The closed-form updates of a block (docs/algorithm.md s.6), folded task by task.

With n_t = max(||G_t||_F, eps), s_t = 1 / n_t and anchor(p) = rho * M0[p] + (1 - rho) * base[p]:

    A = sum_t s_t G_t + (lam + eps) I
    B = sum_t s_t C_t W_t^T + lam anchor(W)^T                 W* = (A^{-1} B)^T
    b* = (sum_t s_t (b_t + W_t mu_t) - W* sum_t s_t mu_s + lam anchor(b)) / (sum_t s_t + lam)

Members of a group share A and are solved together with concatenated right-hand sides.
LayerNorm affine: the per-channel 2x2 system of s.6; weight-only norms (RMSNorm, LayerNorm
without bias): g* = (sum_t e_t g_t + lam g_a) / (sum_t e_t + lam).
`fold` adds one task's normalised statistics into these sums, so only one task's statistics
live at a time; systems folded from disjoint sets of tasks add with `add_`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .. import ops
from ..config import FeatCalConfig
from ..errors import FeatCalError, Location
from ..models.modules import LINEAR, ModuleRef
from .plan import BlockPlan, Group
from .statistics import LinearMoments, NormMoments
from .tensor_state import TensorState


class Update(NamedTuple):
    """A solved parameter: module name, "weight" or "bias", value (W as (d_out, d_in), or gamma)."""

    module: str
    which: str
    value: Tensor


Anchor = tuple[Tensor | None, Tensor | None]  # of W (or gamma) and of the bias; None: no ridge term


@dataclass
class LinearSystem(TensorState):
    """The folded normal equations of a linear group."""

    group: Group
    A: Tensor  # (d, d) sum_t s_t G_t
    B: list[Tensor]  # per member (d, d_out) sum_t s_t C_t W_t^T
    R: list[Tensor]  # per member (d_out,) sum_t s_t (b_t + W_t mu_t)
    V: Tensor  # (d,) sum_t s_t mu_s
    s: Tensor  # () sum_t s_t
    tokens: Tensor  # () sum_t of the token weights (a routed expert's: of the tokens routed to it)

    def collective_tensors(self, panels: int = 8) -> list[Tensor]:
        """What a sum over processes must carry: A's lower triangle, as `panels` bands of rows
        (views; rows r0..r1 up to column r1, about (1 + 1 / panels) / 2 of A), since the solve
        reads no more of A; then B, R, V, s."""
        d = self.A.shape[0]
        bounds = [d * k // panels for k in range(panels + 1)]
        lower = [self.A[r0:r1, :r1] for r0, r1 in zip(bounds, bounds[1:]) if r1 > r0]
        return [*lower, *self.B, *self.R, self.V, self.s, self.tokens]


@dataclass
class NormSystem(TensorState):
    """The folded per-channel sums of a norm group."""

    group: Group
    energy: Tensor  # (d,) sum_t e_t
    mean: Tensor  # (d,) sum_t m_t
    r1: list[Tensor]  # per member sum_t (e_t g_t + m_t c_t)
    r2: list[Tensor]  # per member sum_t (m_t g_t + c_t)

    def collective_tensors(self) -> list[Tensor]:
        """What a sum over processes must carry: every tensor."""
        return self.tensors()


@dataclass
class BlockSystem(TensorState):
    """Sums over tasks of the statistics of one block, one system per group of the plan."""

    groups: list[LinearSystem | NormSystem] = field(default_factory=list)
    tasks: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))  # folded
    # Routed experts that `solve` left merged, with fewer tokens than the threshold: name -> tokens.
    low_coverage: dict[str, int] = field(default_factory=dict)

    @classmethod
    def zeros(cls, plan: BlockPlan, dtype: torch.dtype, device: torch.device) -> BlockSystem:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        groups: list[LinearSystem | NormSystem] = []
        for group in plan.groups:
            d, members = group.d_in, group.members
            if group.kind == LINEAR:
                B = [zeros(d, m.d_out) for m in members]
                R = [zeros(m.d_out) for m in members]
                groups.append(LinearSystem(group, zeros(d, d), B, R, zeros(d), zeros(), zeros()))
            else:
                r1, r2 = [zeros(d) for _ in members], [zeros(d) for _ in members]
                groups.append(NormSystem(group, zeros(d), zeros(d), r1, r2))
        return cls(groups, torch.zeros((), dtype=torch.int64, device=device))

    def count_tokens(self, weights: Sequence[Tensor]) -> None:
        """Add one task's token weight per group (its sums' `weight`) to the linear systems."""
        for system, weight in zip(self.groups, weights):
            if isinstance(system, LinearSystem):
                system.tokens += weight

    def fold(
        self,
        moments: Sequence[LinearMoments | NormMoments | None],
        expert: dict[str, ModuleRef],
        eps: float,
        where: Location | None = None,
    ) -> None:
        """Fold one task's statistics, with that task's expert parameters (`where`: the task and
        block, for messages); None: a routed expert the task's tokens never reach."""
        self.tasks += 1
        for system, mom in zip(self.groups, moments):
            if mom is None:
                continue
            like = system.A if isinstance(system, LinearSystem) else system.energy
            dtype, device = like.dtype, like.device
            members = mom.group.members
            if isinstance(system, NormSystem):
                system.energy += mom.energy
                system.mean += mom.mean
                for k, m in enumerate(members):
                    g, c = expert[m.name].params(dtype, device)
                    system.r1[k] += mom.energy * g
                    system.r2[k] += mom.mean * g
                    if c is not None:
                        system.r1[k] += mom.mean * c
                        system.r2[k] += c
                continue
            norm = ops.assemble(system.A, mom.gram, eps)
            if norm == 0:
                prefix = "" if where is None else f"{where}: "
                raise FeatCalError(
                    f"{prefix}the inputs of module(s) {mom.group.names} are all zero for a task; "
                    "set covariance_eps > 0 to solve this block"
                )
            scale = 1.0 / norm
            system.V.add_(mom.mean_student, alpha=scale)
            system.s += scale
            for k, m in enumerate(members):
                system.B[k].add_(mom.rhs[k], alpha=scale)
                b = expert[m.name].bias_as(dtype, device)
                teacher = mom.teacher_out[k] if b is None else mom.teacher_out[k] + b
                system.R[k].add_(teacher, alpha=scale)

    def solve(
        self,
        anchors: dict[str, Anchor],
        config: FeatCalConfig,
        groups: Sequence[int] | None = None,
        where: Location | None = None,
    ) -> list[Update]:
        """The new parameters of the given groups (default: all), from their folded sums.

        anchors[name]: the module's anchors (see `anchors_of`). Which members have a bias, and
        their d_out, are read from the plan's module references. Solves each group once: its sums
        become the right-hand sides, in place. `where` (the block) prefixes the solver's messages.
        """
        lam, eps = config.ridge, config.covariance_eps
        updates: list[Update] = []
        tasks = int(self.tasks)
        indices = range(len(self.groups)) if groups is None else groups
        self.low_coverage = self._low_coverage(indices, config.min_expert_tokens)
        for i in indices:
            system = self.groups[i]
            group_anchors = [anchors[name] for name in system.group.names]
            if system.group.leader.name in self.low_coverage:
                continue
            if isinstance(system, LinearSystem):
                names = system.group.names
                at = f"module(s) {names}" if where is None else f"{where}, module(s) {names}"
                updates += _solve_linear(system, group_anchors, lam, eps, config.calibrate_bias, at)
            elif config.calibrate_layernorm:
                updates += _solve_norm(system, group_anchors, lam, eps, tasks)
        return updates

    def _low_coverage(self, indices: Sequence[int], minimum: int) -> dict[str, int]:
        """The routed experts among `indices` whose tokens (over all tasks) are fewer than
        `minimum`: name -> tokens (one host sync)."""
        routed = [self.groups[i] for i in indices if self.groups[i].group.leader.routed]
        if not routed:
            return {}
        tokens = torch.stack([system.tokens for system in routed]).tolist()
        return {system.group.leader.name: round(n) for system, n in zip(routed, tokens) if n < minimum}


def anchors_of(
    plan: BlockPlan,
    merged: dict[str, ModuleRef],
    base: dict[str, ModuleRef] | None,
    rho: float,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Anchor]:
    """rho * merged + (1 - rho) * base of every planned module's weight (d_out, d_in) and bias,
    from the merged block as it is now (before any update); (None, None) without a base."""
    out = {}
    for group in plan.groups:
        for m in group.members:
            if base is None:
                out[m.name] = (None, None)
                continue
            (w, b), (base_w, base_b) = (
                merged[m.name].params(dtype, device),
                base[m.name].params(dtype, device),
            )
            bias = None if b is None or base_b is None else rho * b + (1 - rho) * base_b
            out[m.name] = (rho * w + (1 - rho) * base_w, bias)
    return out


def _solve_linear(system: LinearSystem, anchors, lam, eps, calibrate_bias: bool, where: str) -> list[Update]:
    rhs = [B if a is None else B.add_(a.mT, alpha=lam) for B, (a, _) in zip(system.B, anchors)]
    X = ops.ridge_solve(system.A, rhs, lam + (eps if eps > 0 else 0.0), where=where)
    updates, start = [], 0
    for k, ref in enumerate(system.group.members):
        W = X[:, start : start + ref.d_out].mT
        start += ref.d_out
        updates.append(Update(ref.name, "weight", W))
        if not calibrate_bias or ref.bias() is None:
            continue
        num, den = system.R[k] - W @ system.V, system.s
        bias_anchor = anchors[k][1]
        if bias_anchor is not None:
            num, den = num + lam * bias_anchor, den + lam
        updates.append(Update(ref.name, "bias", num / den.clamp_min(torch.finfo(system.A.dtype).eps)))
    return updates


def _solve_norm(system: NormSystem, anchors, lam, eps, tasks: int) -> list[Update]:
    updates = []
    tiny = torch.finfo(system.energy.dtype).eps
    for k, ref in enumerate(system.group.members):
        g_anchor, c_anchor = anchors[k]
        lam_g = lam if g_anchor is not None else 0.0
        r1 = system.r1[k] + (lam * g_anchor if g_anchor is not None else 0.0)
        if ref.bias() is None:
            den = (system.energy + lam_g).clamp_min(tiny)
            updates.append(Update(ref.name, "weight", r1 / den))
            continue
        lam_c = lam if c_anchor is not None else 0.0
        r2 = system.r2[k] + (lam * c_anchor if c_anchor is not None else 0.0)
        a11, a12, a22 = system.energy + lam_g, system.mean, tasks + lam_c
        det = (a11 * a22 - a12.square()).clamp_min(eps)
        updates.append(Update(ref.name, "weight", (a22 * r1 - a12 * r2) / det))
        updates.append(Update(ref.name, "bias", (a11 * r2 - a12 * r1) / det))
    return updates
