"""Per-task statistics of one block (featcal-math.md s.3), accumulated batch by batch in hooks.

Modules that read the same input tensor with the same token weights form a group and share
one Gram (q/k/v; gate/up). For a linear group and task t, with token weights w:

    S_w = sum w,   G = sum w x_s x_s^T / S_w,   mu_s = sum w x_s / S_w,

and for each member m (expert weight W, bias b) the right-hand side Q_m = C W^T, with
C = sum w x_s x_t^T / S_w and x_t = alpha x_e + (1 - alpha) x_s, in one of two exact ways:

    cross:    X = sum w x_s x_e^T (d_in x d_in);  C = alpha X / S_w + (1 - alpha) G;  Q = C W^T
    project:  Q = sum w x_s (alpha (y_e - b) + (1 - alpha) x_s W^T)^T / S_w, where y_e is the
              expert module's own output. The sums run over y_e itself and b is taken out once
              at the end (- alpha mu_s b^T); with more tokens than inputs the (1 - alpha) part
              is taken once as (1 - alpha) G W^T instead of token by token.

plus the teacher's mean output W mu_t for the bias. Norm groups accumulate the moments of
z = norm(x_s) without affine: mean = sum w z / S_w and energy = sum w z^2 / S_w.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import ops
from ..errors import FeatCalError, NonFiniteError
from ..models.modules import LINEAR, RMSNORM, ModuleRef


@dataclass
class Group:
    """Calibrated modules of a block that read one input tensor with one token weighting."""

    kind: str
    members: list[ModuleRef]
    focus: float | None
    memory: bool = False  # reads the encoder output (T5 cross-attention keys and values)

    @property
    def leader(self) -> ModuleRef:
        return self.members[0]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def d_in(self) -> int:
        return self.leader.d_in

    @property
    def d_out(self) -> int:
        return sum(m.d_out for m in self.members)


@dataclass
class BlockPlan:
    """The groups of a block, found by watching which modules receive the same tensor."""

    groups: list[Group]
    last: str
    skipped: list[str] = field(default_factory=list)


def discover_plan(
    order: list[str],
    inputs: dict[str, Tensor],
    modules: dict[str, ModuleRef],
    focus: Callable[[str], float | None],
    where: str,
    memory: Callable[[str], bool] | None = None,
) -> BlockPlan:
    """Group the modules called in `order` (one forward) by identical input tensor, kind, focus and
    token set (`memory(name)`: the module reads the encoder output, weighted by its mask)."""
    repeated = sorted({name for name in order if order.count(name) > 1})
    if repeated:
        raise FeatCalError(
            f"{where}: modules {repeated} are called more than once in one forward pass; "
            "FeatCal needs exactly one input per calibrated module"
        )
    found: list[tuple[tuple, Tensor, Group]] = []  # (kind, eps, focus, memory), input, group
    for name in order:
        ref, x = modules[name], inputs[name]
        reads_memory = bool(memory and memory(name))
        key = (ref.kind, None if ref.kind == LINEAR else ref.norm_eps(), focus(name), reads_memory)
        group = next((g for k, gx, g in found if k == key and gx is x), None)
        if group is None:
            found.append((key, x, Group(ref.kind, [ref], key[2], reads_memory)))
        else:
            group.members.append(ref)
    skipped = [name for name in modules if name not in order]
    return BlockPlan([g for _, _, g in found], order[-1], skipped)


def choose_method(group: Group, tokens: int, alpha: float, requested: str) -> str:
    """'cross' or 'project' for a linear group: the requested one, or for 'auto' the cheaper.

    flops per task: cross 2 n d^2 + 2 d^2 D; project 2 n d D + min(2 n d D, 2 d^2 D) (D = sum d_out).
    """
    if requested != "auto":
        return requested
    n, d, big_d = tokens, group.d_in, group.d_out
    cross = 2 * n * d * d + 2 * d * d * big_d
    project = 2 * n * d * big_d + (0 if alpha == 1 else 2 * d * big_d * min(n, d))
    return "cross" if cross <= project else "project"


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


class ExpertCache:
    """What the statistics of one batch need from the expert's forward pass.

    With `record_all` it keeps every calibrated module's input and output and the call order
    (used once per block to discover the groups); otherwise only the inputs and outputs named
    by the statistics.
    """

    def __init__(self, record_all: bool = False) -> None:
        self.record_all = record_all
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

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.order.clear()


class TaskStatistics:
    """Accumulates one task's statistics for every group of a block, one batch at a time."""

    def __init__(
        self,
        plan: BlockPlan,
        expert: dict[str, ModuleRef],
        *,
        alpha: float,
        tokens: int,
        cross_method: str,
        tf32: bool = False,
        dtype: torch.dtype,
        device: torch.device,
        where: str,
    ) -> None:
        self.plan, self.expert, self.alpha, self.tf32 = plan, expert, float(alpha), tf32
        self.where = where  # names the task and block in messages
        self.dtype, self.device = dtype, device
        self.method: dict[int, str] = {}
        self.per_token: dict[int, bool] = {}
        self.buffers: dict[int, dict[str, Tensor]] = {}
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        for i, group in enumerate(plan.groups):
            buf = {"weight_sum": zeros()}
            d = group.d_in
            if group.kind == LINEAR:
                self.method[i] = choose_method(group, tokens, alpha, cross_method)
                buf["gram"], buf["sum_s"] = zeros(d, d), zeros(d)
                if self.method[i] == "cross":
                    buf["cross"], buf["sum_e"] = zeros(d, d), zeros(d)
                else:
                    self.per_token[i] = self.alpha != 1 and tokens < d
                    for m in group.members:
                        buf[f"rhs:{m.name}"] = zeros(d, m.d_out)
                        buf[f"out:{m.name}"] = zeros(m.d_out)
            else:
                buf["z_sum"], buf["z_sq"] = zeros(d), zeros(d)
            self.buffers[i] = buf
        self._mask: Tensor | None = None
        self._memory_mask: Tensor | None = None
        self._cache: ExpertCache | None = None
        self._weights: dict = {}
        self._seen: set[int] = set()

    def needs(self) -> tuple[set[str], set[str]]:
        """Names of the expert modules whose input, and whose output, the statistics read."""
        inputs, outputs = set(), set()
        for i, group in enumerate(self.plan.groups):
            if self.method.get(i) == "cross":
                inputs.add(group.leader.name)
            elif self.method.get(i) == "project":
                outputs.update(group.names)
        return inputs, outputs

    def begin_batch(self, mask: Tensor | None, cache: ExpertCache, memory_mask: Tensor | None = None) -> None:
        """Start a batch: its (batch, tokens) padding weights, those of the encoder output that
        memory groups read, and the expert's cached tensors."""
        self._mask, self._memory_mask, self._cache = mask, memory_mask, cache
        self._weights, self._seen = {}, set()

    def end_batch(self) -> None:
        """Check that every group received exactly one input during the batch's forward pass."""
        missed = [g.names for i, g in enumerate(self.plan.groups) if i not in self._seen]
        if missed:
            raise FeatCalError(
                f"{self.where}: modules {missed} were not called in a "
                "forward pass that called them in the first batch"
            )

    def accumulate(self, i: int, x: Tensor) -> None:
        """Add the student input x (batch, tokens, d_in) of group i for the current batch."""
        group = self.plan.groups[i]
        if i in self._seen:
            raise FeatCalError(
                f"{self.where}: modules {group.names} were called twice "
                "in one forward pass; FeatCal needs exactly one input per calibrated module"
            )
        self._seen.add(i)
        buf = self.buffers[i]
        x2 = x.reshape(-1, x.shape[-1])
        w = self._token_weights(group, x)
        buf["weight_sum"] += x2.shape[0] if w is None else w.sum()
        if group.kind != LINEAR:
            ops.norm_moments(
                x2,
                w,
                rms=group.kind == RMSNORM,
                eps=group.leader.norm_eps(),
                out_sum=buf["z_sum"],
                out_sq=buf["z_sq"],
            )
            return
        ops.weighted_gram(x2, w, buf["gram"], lower_only=True, out_sum=buf["sum_s"], tf32=self.tf32)
        if self.method[i] == "cross":
            xe = self._cache.inputs[group.leader.name]
            if xe.shape != x.shape:
                raise FeatCalError(
                    f"{self.where}: module {group.leader.name!r} reads an "
                    f"input of shape {tuple(x.shape)} in the merged model but {tuple(xe.shape)} in "
                    "the expert"
                )
            xe2 = xe.reshape(-1, xe.shape[-1])
            ops.weighted_cross(x2, xe2, w, buf["cross"], out_sum_y=buf["sum_e"], tf32=self.tf32)
            return
        for m in group.members:
            ye = self._cache.outputs[m.name]
            y = ye.reshape(-1, ye.shape[-1])
            out_sum = buf[f"out:{m.name}"]
            if self.per_token[i]:
                W, _ = self.expert[m.name].params(self.dtype, self.device)
                ops.weighted_sum(y, w, out_sum)
                y = torch.addmm(
                    y.to(self.dtype), x2.to(self.dtype), W.mT, beta=self.alpha, alpha=1 - self.alpha
                )
                out_sum = None
            ops.weighted_cross(x2, y, w, buf[f"rhs:{m.name}"], out_sum_y=out_sum, tf32=self.tf32)

    def finish(self, project: bool = True) -> list[LinearMoments | CrossMoments | NormMoments]:
        """The task's normalised statistics per group, checked for NaN and Inf.

        With project=False, linear groups accumulated by the 'cross' method come back as
        CrossMoments (C_t and mu_t themselves) instead of being multiplied by the expert weights.
        """
        out = []
        for i, group in enumerate(self.plan.groups):
            buf = self.buffers.pop(i)
            total = buf["weight_sum"]
            if not total > 0:
                raise FeatCalError(
                    f"{self.where}: no token with nonzero weight reached module(s) {group.names}; "
                    "every calibration token is padding"
                )
            if group.kind != LINEAR:
                mean, energy = buf["z_sum"] / total, buf["z_sq"] / total
                self._check(group, "student (merged model)", mean, energy)
                out.append(NormMoments(group, mean, energy))
                continue
            gram = ops.complete_gram(buf["gram"]).div_(total)
            mean_s = buf["sum_s"] / total
            self._check(group, "student (merged model)", gram, mean_s)
            rhs, teacher = [], []
            if self.method[i] == "cross":
                cross = buf["cross"].div_(total).mul_(self.alpha).add_(gram, alpha=1 - self.alpha)
                mean_t = buf["sum_e"].div_(total).mul_(self.alpha).add_(mean_s, alpha=1 - self.alpha)
                self._check(group, "expert", cross, mean_t)
                if not project:
                    out.append(CrossMoments(group, gram, mean_s, cross, mean_t))
                    continue
                for m in group.members:
                    W, _ = self.expert[m.name].params(self.dtype, self.device)
                    rhs.append(cross @ W.mT)
                    teacher.append(W @ mean_t)
            else:
                for m in group.members:
                    W, b = self.expert[m.name].params(self.dtype, self.device)
                    q = buf[f"rhs:{m.name}"].div_(total)
                    mean_out = buf[f"out:{m.name}"].div_(total)
                    if b is not None:
                        q.addr_(mean_s, b, alpha=-(self.alpha if self.per_token[i] else 1.0))
                        mean_out.sub_(b)
                    if not self.per_token[i]:
                        q.mul_(self.alpha).addmm_(gram, W.mT, alpha=1 - self.alpha)
                    mean_out.mul_(self.alpha).addmv_(W, mean_s, alpha=1 - self.alpha)
                    self._check(group, "expert", q, mean_out)
                    rhs.append(q)
                    teacher.append(mean_out)
            out.append(LinearMoments(group, gram, mean_s, rhs, teacher))
        return out

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

    def _check(self, group: Group, side: str, *tensors: Tensor) -> None:
        if all(ops.all_finite(t) for t in tensors):
            return
        raise NonFiniteError(
            f"NaN or Inf in the activations of {self.where}, module(s) {group.names} ({side} side)"
        )
