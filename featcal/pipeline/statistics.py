"""Per-task statistics of a block (docs/algorithm.md s.4-5): raw sums, then their normalisation.

For a linear group and task t, with token weights w, the raw sums are

    S_w = sum w,   sum w x_s x_s^T (lower triangle),   sum w x_s,

and the right-hand side's, by one of two exact methods (s.5):

    cross:    X = sum w x_s x_e^T and sum w x_e; then C = alpha X / S_w + (1 - alpha) G, Q_m = C W_m^T
    project:  per member m, sum w x_s y^T and sum w y_e, with y the expert module's own output y_e
              (or, with fewer tokens than inputs, y = alpha y_e + (1 - alpha) x_s W_m^T token by
              token); the bias is taken out once and (1 - alpha) G W_m^T added at normalisation.

Norm groups sum z = norm(x_s) without affine and z^2. The sums are linear in the tokens: sums
of disjoint work items add (`TaskSums.add_`), and only the reduced sums are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import ops
from ..errors import FeatCalError, Location, NonFiniteError
from ..models.modules import LINEAR, ModuleRef
from .plan import BlockPlan, Group, choose_method
from .tensor_state import TensorState


@dataclass
class CrossSums(TensorState):
    """Raw sums of a linear group whose right-hand side is formed by the 'cross' method."""

    group: Group
    weight: Tensor  # () sum w
    gram: Tensor  # (d, d) sum w x_s x_s^T, lower triangle
    student: Tensor  # (d,) sum w x_s
    cross: Tensor  # (d, d) sum w x_s x_e^T
    expert: Tensor  # (d,) sum w x_e


@dataclass
class ProjectSums(TensorState):
    """Raw sums of a linear group whose right-hand side is formed by the 'project' method."""

    group: Group
    per_token: bool  # (1 - alpha) x_s W^T folded in token by token (fewer tokens than inputs)
    weight: Tensor
    gram: Tensor
    student: Tensor
    rhs: list[Tensor]  # per member (d, d_out) sum w x_s y^T
    outputs: list[Tensor]  # per member (d_out,) sum w y_e


@dataclass
class NormSums(TensorState):
    """Raw sums of a norm group: of z = norm(x_s) without affine, and of z^2."""

    group: Group
    weight: Tensor
    z: Tensor
    z_square: Tensor


GroupSums = CrossSums | ProjectSums | NormSums


@dataclass
class TaskSums(TensorState):
    """One task's raw sums for the groups of a plan, in the plan's order."""

    groups: list[GroupSums] = field(default_factory=list)

    @classmethod
    def zeros(
        cls,
        plan: BlockPlan,
        *,
        tokens: int,
        alpha: float,
        cross_method: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> TaskSums:
        """Empty sums. `tokens`: the task's token count over all its batches, which picks each
        linear group's method (the same in every process that works on the task)."""

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        groups: list[GroupSums] = []
        for group in plan.groups:
            d = group.d_in
            if group.kind != LINEAR:
                groups.append(NormSums(group, zeros(), zeros(d), zeros(d)))
            elif choose_method(group, tokens, alpha, cross_method) == "cross":
                groups.append(CrossSums(group, zeros(), zeros(d, d), zeros(d), zeros(d, d), zeros(d)))
            else:
                rhs = [zeros(d, m.d_out) for m in group.members]
                outputs = [zeros(m.d_out) for m in group.members]
                per_token = alpha != 1 and tokens < d
                groups.append(ProjectSums(group, per_token, zeros(), zeros(d, d), zeros(d), rhs, outputs))
        return cls(groups)

    def needs(self) -> tuple[set[str], set[str]]:
        """Names of the expert modules whose input, and whose output, the sums read."""
        inputs, outputs = set(), set()
        for sums in self.groups:
            if isinstance(sums, CrossSums):
                inputs.add(sums.group.leader.name)
            elif isinstance(sums, ProjectSums):
                outputs.update(sums.group.names)
        return inputs, outputs


class ExpertCache:
    """What the statistics of one batch need from the expert's forward pass.

    With `record_all` it keeps every calibrated module's input and output and the call order
    (used once per block to discover the groups); otherwise only the inputs and outputs named
    by the statistics. With `stop_early` the forward may end once it has them all (`complete`).
    """

    def __init__(self, record_all: bool = False, stop_early: bool = False) -> None:
        self.record_all, self.stop_early = record_all, stop_early
        self.need_inputs: set[str] = set()
        self.need_outputs: set[str] = set()
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.order: list[str] = []

    def on_input(self, name: str, x: Tensor) -> None:
        if self.record_all:
            self.order.append(name)
        if self.record_all or name in self.need_inputs:
            self.inputs[name] = x

    def on_output(self, name: str, y: Tensor) -> None:
        if self.record_all or name in self.need_outputs:
            self.outputs[name] = y

    def complete(self) -> bool:
        """Whether every input and output the statistics need is recorded."""
        return self.need_inputs <= self.inputs.keys() and self.need_outputs <= self.outputs.keys()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.order.clear()


class Accumulator:
    """Adds one task's batches into its `TaskSums`, one group input at a time (from hooks).

    expert: the task's expert modules of the block (W_m for the per-token projection).
    """

    def __init__(
        self,
        sums: TaskSums,
        expert: dict[str, ModuleRef],
        *,
        alpha: float,
        precision: str = "ieee",
        where: Location,
    ) -> None:
        self.sums, self.expert, self.alpha, self.where = sums, expert, float(alpha), where
        self.precision = precision
        first = sums.groups[0]
        self.dtype, self.device = first.weight.dtype, first.weight.device
        self._mask: Tensor | None = None
        self._memory_mask: Tensor | None = None
        self._cache: ExpertCache | None = None
        self._weights: dict = {}
        self._seen: set[int] = set()

    @property
    def groups(self) -> list[Group]:
        return [s.group for s in self.sums.groups]

    def begin_batch(self, mask: Tensor | None, cache: ExpertCache, memory_mask: Tensor | None = None) -> None:
        """Start a batch: its (batch, tokens) padding weights, those of the encoder output that
        memory groups read, and the expert's cached tensors."""
        self._mask, self._memory_mask, self._cache = mask, memory_mask, cache
        self._weights, self._seen = {}, set()

    def end_batch(self) -> None:
        """Check that every group received exactly one input during the batch's forward pass."""
        missed = [g.names for i, g in enumerate(self.groups) if i not in self._seen]
        if missed:
            raise FeatCalError(
                f"{self.where}: modules {missed} were not called in a "
                "forward pass that called them in the first batch"
            )

    def accumulate(self, i: int, x: Tensor) -> None:
        """Add the student input x (batch, tokens, d_in) of group i for the current batch."""
        sums = self.sums.groups[i]
        group = sums.group
        if i in self._seen:
            raise FeatCalError(
                f"{self.where}: modules {group.names} were called twice "
                "in one forward pass; FeatCal needs exactly one input per calibrated module"
            )
        self._seen.add(i)
        x2 = x.reshape(-1, x.shape[-1])
        w = self._token_weights(group, x)
        sums.weight += x2.shape[0] if w is None else w.sum()
        if isinstance(sums, NormSums):
            eps = group.leader.norm_eps()
            ops.norm_moments(x2, w, rms=group.leader.is_rms, eps=eps, out_sum=sums.z, out_sq=sums.z_square)
            return
        ops.weighted_gram(x2, w, sums.gram, lower_only=True, out_sum=sums.student, precision=self.precision)
        if isinstance(sums, CrossSums):
            xe = self._cache.inputs[group.leader.name]
            if xe.shape != x.shape:
                raise FeatCalError(
                    f"{self.where}: module {group.leader.name!r} reads an "
                    f"input of shape {tuple(x.shape)} in the merged model but {tuple(xe.shape)} in "
                    "the expert"
                )
            xe2 = xe.reshape(-1, xe.shape[-1])
            ops.weighted_cross(x2, xe2, w, sums.cross, out_sum_y=sums.expert, precision=self.precision)
            return
        for k, m in enumerate(group.members):
            ye = self._cache.outputs[m.name]
            y = ye.reshape(-1, ye.shape[-1])
            out_sum = sums.outputs[k]
            if sums.per_token:
                W, _ = self.expert[m.name].params(self.dtype, self.device)
                ops.weighted_sum(y, w, out_sum)
                y = torch.addmm(
                    y.to(self.dtype), x2.to(self.dtype), W.mT, beta=self.alpha, alpha=1 - self.alpha
                )
                out_sum = None
            ops.weighted_cross(x2, y, w, sums.rhs[k], out_sum_y=out_sum, precision=self.precision)

    def _token_weights(self, group: Group, x: Tensor) -> Tensor | None:
        key = (group.focus, group.memory)
        if key not in self._weights:
            w = self._memory_mask if group.memory else self._mask
            if w is not None and tuple(w.shape) != tuple(x.shape[:2]):
                raise FeatCalError(
                    f"{self.where}: modules {group.names} read "
                    f"{x.shape[1]} tokens per example but their token weights cover {w.shape[1]}"
                )
            if group.focus is not None and x.shape[1] > 1:
                f = torch.ones(x.shape[:2], dtype=self.dtype, device=x.device)
                f[:, 1:] = group.focus
                w = f if w is None else w * f
            self._weights[key] = None if w is None else w.reshape(-1)
        return self._weights[key]


@dataclass
class LinearMoments:
    """One task's statistics of a linear group: G_t, mu_s, and per member C_t W^T and W mu_t."""

    group: Group
    gram: Tensor
    mean_student: Tensor
    rhs: list[Tensor]
    teacher_out: list[Tensor]


@dataclass
class CrossMoments:
    """One task's statistics of a linear group in the reference's form: G_t, mu_s, C_t and mu_t."""

    group: Group
    gram: Tensor
    mean_student: Tensor
    cross: Tensor
    mean_teacher: Tensor


@dataclass
class NormMoments:
    """One task's statistics of a norm group: weighted mean and energy of z = norm(x_s)."""

    group: Group
    mean: Tensor
    energy: Tensor


Moments = LinearMoments | CrossMoments | NormMoments


def normalise(
    sums: TaskSums, expert: dict[str, ModuleRef], *, alpha: float, where: Location
) -> list[Moments]:
    """A task's reduced sums as weighted means, checked for NaN and Inf (s.4): CrossMoments for
    'cross' groups, LinearMoments for 'project' groups, NormMoments for norms. Consumes `sums`
    (its tensors are reused for the results). The checks of all groups are read back in one host
    sync, at the end."""
    out: list[Moments] = []
    checks = _Checks()
    for s in sums.groups:
        group, total = s.group, s.weight
        checks.add(
            total > 0,
            FeatCalError(
                f"{where}: no token with nonzero weight reached module(s) {group.names}; "
                "every calibration token is padding"
            ),
        )
        student = _non_finite(where, group, "student (merged model)")
        if isinstance(s, NormSums):
            mean, energy = s.z / total, s.z_square / total
            checks.finite(student, mean, energy)
            out.append(NormMoments(group, mean, energy))
            continue
        gram = ops.complete_gram(s.gram).div_(total)
        mean_s = s.student / total
        checks.finite(student, gram, mean_s)
        if isinstance(s, CrossSums):
            cross = s.cross.div_(total).mul_(alpha).add_(gram, alpha=1 - alpha)
            mean_t = s.expert.div_(total).mul_(alpha).add_(mean_s, alpha=1 - alpha)
            checks.finite(_non_finite(where, group, "expert"), cross, mean_t)
            out.append(CrossMoments(group, gram, mean_s, cross, mean_t))
            continue
        rhs, teacher = [], []
        dtype, device = gram.dtype, gram.device
        for k, m in enumerate(group.members):
            W, b = expert[m.name].params(dtype, device)
            q = s.rhs[k].div_(total)
            mean_out = s.outputs[k].div_(total)
            if b is not None:
                q.addr_(mean_s, b, alpha=-(alpha if s.per_token else 1.0))
                mean_out.sub_(b)
            if not s.per_token:
                q.mul_(alpha).addmm_(gram, W.mT, alpha=1 - alpha)
            mean_out.mul_(alpha).addmv_(W, mean_s, alpha=1 - alpha)
            checks.finite(_non_finite(where, group, "expert"), q, mean_out)
            rhs.append(q)
            teacher.append(mean_out)
        out.append(LinearMoments(group, gram, mean_s, rhs, teacher))
    checks.raise_first()
    return out


def project(moments: Moments, expert: dict[str, ModuleRef]) -> LinearMoments | NormMoments:
    """CrossMoments as the solver takes them: per member C_t W^T and W mu_t; others as they are."""
    if not isinstance(moments, CrossMoments):
        return moments
    dtype, device = moments.gram.dtype, moments.gram.device
    rhs, teacher = [], []
    for m in moments.group.members:
        W, _ = expert[m.name].params(dtype, device)
        rhs.append(moments.cross @ W.mT)
        teacher.append(W @ moments.mean_teacher)
    return LinearMoments(moments.group, moments.gram, moments.mean_student, rhs, teacher)


def _non_finite(where: Location, group: Group, side: str) -> NonFiniteError:
    return NonFiniteError(f"NaN or Inf in the activations of {where}, module(s) {group.names} ({side} side)")


class _Checks:
    """Conditions held as device booleans, read back in one host sync; the first false raises."""

    def __init__(self) -> None:
        self._flags: list[Tensor] = []
        self._errors: list[Exception] = []

    def add(self, flag: Tensor, error: Exception) -> None:
        self._flags.append(flag.reshape(()))
        self._errors.append(error)

    def finite(self, error: Exception, *tensors: Tensor) -> None:
        self.add(torch.stack([torch.isfinite(t).all() for t in tensors]).all(), error)

    def raise_first(self) -> None:
        if not self._flags:
            return
        for ok, error in zip(torch.stack(self._flags).tolist(), self._errors):
            if not ok:
                raise error
