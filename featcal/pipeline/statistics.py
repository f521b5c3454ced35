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
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..errors import FeatCalError, Location, NonFiniteError
from ..models.modules import EXPERT_PARAMETERS, LINEAR, ModuleRef
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
            elif group.leader.routed or choose_method(group, tokens, alpha, cross_method) == "cross":
                # (a routed expert's tokens are known only once routed: always 'cross')
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


def expert_hidden(experts: nn.Module, e: int, x: Tensor) -> Tensor:
    """act(gate) * up of routed expert e of fused experts on rows x: the input of its down_proj."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


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

    def _mark(self, i: int) -> None:
        if i in self._seen:
            raise FeatCalError(
                f"{self.where}: modules {self.groups[i].names} were called twice "
                "in one forward pass; FeatCal needs exactly one input per calibrated module"
            )
        self._seen.add(i)

    def accumulate(self, i: int, x: Tensor) -> None:
        """Add the student input x (batch, tokens, ..., d_in), or (batch * tokens, d_in), of group
        i for the current batch. Rows of weight 0 (padding) are left out before any product, so
        whatever a model leaves in them (even NaN) cannot reach the sums."""
        self._mark(i)
        group = self.sums.groups[i].group
        w, rows = self._token_weights(group, x)
        xe = None
        if isinstance(self.sums.groups[i], CrossSums):
            xe = self._rows(self._expert_input(group.leader.name, x), rows)
        ys = None
        if isinstance(self.sums.groups[i], ProjectSums):
            ys = [self._rows(self._cache.outputs[m.name], rows) for m in group.members]
        self._add(i, self._rows(x, rows), w, xe, ys)

    def accumulate_routed(self, indices: list[int], x: Tensor, routes: Tensor) -> None:
        """Add the routed experts' groups `indices` of one fused experts module, whose student
        input is x (batch * tokens, d) and routing (batch * tokens, top_k) expert indices (the
        merged model's). Expert e's maps see the rows routed to e: gate_up_proj[e] reads them,
        down_proj[e] act(gate) * up of them; the teacher's are the same rows of the expert
        model's own input, through its own expert e. Rows are grouped by expert in one sort;
        padding rows are routed nowhere."""
        for i in indices:
            self._mark(i)
        refs = {i: self.groups[i].leader for i in indices}
        first = refs[indices[0]]
        experts = getattr(first.module, EXPERT_PARAMETERS[0]).shape[0]
        w_all, kept = self._token_weights(self.groups[indices[0]], x)
        if kept is not None:
            dropped = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            dropped[kept] = False
            routes = routes.masked_fill(dropped[:, None], experts)
            w_all = torch.zeros(x.shape[0], dtype=w_all.dtype, device=x.device).index_copy_(0, kept, w_all)
        flat = routes.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat.clamp_max(experts), minlength=experts + 1)[:experts].tolist()
        rows_of = torch.split(order[: sum(counts)] // routes.shape[-1], counts)
        xe = self._expert_input(first.name, x)
        by_slot: dict[int, dict[str, int]] = {}
        for i, ref in refs.items():
            by_slot.setdefault(ref.slot, {})[ref.parameter] = i
        for e, parts in by_slot.items():
            rows = rows_of[e]
            if rows.numel() == 0:
                continue
            xs, xt = x[rows], xe[rows]
            w = None if w_all is None else w_all[rows]
            if "gate_up_proj" in parts:
                self._add(parts["gate_up_proj"], xs, w, xt)
            if "down_proj" in parts:
                i = parts["down_proj"]
                teacher = self.expert[self.groups[i].leader.name].module
                self._add(i, expert_hidden(first.module, e, xs), w, expert_hidden(teacher, e, xt))

    def _expert_input(self, name: str, x: Tensor) -> Tensor:
        xe = self._cache.inputs[name]
        if xe.shape != x.shape:
            raise FeatCalError(
                f"{self.where}: module {name!r} reads an input of shape {tuple(x.shape)} in the "
                f"merged model but {tuple(xe.shape)} in the expert"
            )
        return xe

    @staticmethod
    def _rows(x: Tensor, rows: Tensor | None) -> Tensor:
        """x as (rows, features), only the given rows (None: all)."""
        x2 = x.reshape(-1, x.shape[-1])
        return x2 if rows is None else x2.index_select(0, rows)

    def _add(
        self, i: int, x2: Tensor, w: Tensor | None, xe2: Tensor | None, ys: list[Tensor] | None = None
    ) -> None:
        """Add rows x2 (n, d_in) of group i's student input with token weights w (None: all 1);
        xe2: the expert's input at the same rows ('cross' sums); ys: each member's expert output
        there ('project' sums)."""
        sums = self.sums.groups[i]
        group = sums.group
        sums.weight += x2.shape[0] if w is None else w.sum()
        if isinstance(sums, NormSums):
            eps = group.leader.norm_eps()
            ops.norm_moments(x2, w, rms=group.leader.is_rms, eps=eps, out_sum=sums.z, out_sq=sums.z_square)
            return
        ops.weighted_gram(x2, w, sums.gram, lower_only=True, out_sum=sums.student, precision=self.precision)
        if isinstance(sums, CrossSums):
            ops.weighted_cross(x2, xe2, w, sums.cross, out_sum_y=sums.expert, precision=self.precision)
            return
        for k, (m, y) in enumerate(zip(group.members, ys)):
            out_sum = sums.outputs[k]
            if sums.per_token:
                W, _ = self.expert[m.name].params(self.dtype, self.device)
                ops.weighted_sum(y, w, out_sum)
                y = torch.addmm(
                    y.to(self.dtype), x2.to(self.dtype), W.mT, beta=self.alpha, alpha=1 - self.alpha
                )
                out_sum = None
            ops.weighted_cross(x2, y, w, sums.rhs[k], out_sum_y=out_sum, precision=self.precision)

    def _token_weights(self, group: Group, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(weights, rows): the weight of each row of x with nonzero weight, and those rows'
        indices (None, None: every row weighs 1; rows None: every row is kept). Rows of x are
        its (batch, tokens) positions, flattened for an input of batch * tokens rows and
        repeated over the heads of a 4-D input (tokens on group.token_axis)."""
        key = (group.focus, group.memory, group.token_axis, tuple(x.shape[:-1]))
        if key not in self._weights:
            w = self._memory_mask if group.memory else self._mask
            if x.dim() == 2:
                shape = None if w is None else tuple(w.shape)
                if w is not None and w.numel() != x.shape[0]:
                    raise FeatCalError(
                        f"{self.where}: modules {group.names} read {x.shape[0]} rows but their "
                        f"token weights cover {shape[0]} x {shape[1]} tokens"
                    )
            else:
                axis = group.token_axis if x.dim() > 3 else 1
                tokens = (x.shape[0], x.shape[axis])
                if w is not None and tuple(w.shape) != tokens:
                    raise FeatCalError(
                        f"{self.where}: modules {group.names} read "
                        f"{tokens[1]} tokens per example but their token weights cover {w.shape[1]}"
                    )
                if group.focus is not None and tokens[1] > 1:
                    f = torch.ones(tokens, dtype=self.dtype, device=x.device)
                    f[:, 1:] = group.focus
                    w = f if w is None else w * f
                if w is not None and x.dim() > 3:
                    view = [x.shape[0]] + [1] * (x.dim() - 2)
                    view[axis] = tokens[1]
                    w = w.reshape(view).expand(x.shape[:-1])
            rows = None
            if w is not None:
                w = w.reshape(-1)
                keep = w != 0
                if not bool(keep.all()):
                    rows = keep.nonzero().squeeze(1)
                    w = w.index_select(0, rows)
            self._weights[key] = w, rows
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
) -> list[Moments | None]:
    """A task's reduced sums as weighted means, checked for NaN and Inf (s.4): CrossMoments for
    'cross' groups, LinearMoments for 'project' groups, NormMoments for norms, None for a routed
    expert the task's tokens never reach. Consumes `sums` (its tensors are reused for the
    results). The checks of all groups are read back in one host sync, at the end."""
    out: list[Moments | None] = []
    checks = _Checks()
    unreached = _unreached_experts(sums)
    for s in sums.groups:
        group, total = s.group, s.weight
        if id(s) in unreached:
            out.append(None)
            continue
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


def _unreached_experts(sums: TaskSums) -> set[int]:
    """The routed groups of `sums` with no token weight (one host sync when there are any)."""
    routed = [s for s in sums.groups if s.group.leader.routed]
    if not routed:
        return set()
    totals = torch.stack([s.weight for s in routed]).tolist()
    return {id(s) for s, total in zip(routed, totals) if total <= 0}


def project(moments: Moments | None, expert: dict[str, ModuleRef]) -> LinearMoments | NormMoments | None:
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
