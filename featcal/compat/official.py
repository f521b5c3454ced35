"""The published reference's two calibration functions, served by featcal's statistics and solver.

A front end written against the reference code (github egangu/featcal) imports

    from featcal.featcal import collect_layer_statistics
    from featcal.solver import merge_layer_parameters_with_featcal_stats

and calls them once per (layer, task) and once per layer. Importing both from
`featcal.compat.official` instead leaves its calibrate loop as it is: the functions take the
same keyword arguments, return the same structures and compute the same update
(docs/algorithm.md s.4-6). What differs inside:

- statistics: modules that read one input tensor with one token weighting (q/k/v) share one
  Gram and one cross moment, accumulated once; only the Gram's lower triangle is accumulated;
  the teacher input is never formed (C = alpha X / S_w + (1 - alpha) G with X = sum w x_s x_e^T);
  float32 accumulators whatever the activations' dtype (float64 for float64); Triton kernels on
  CUDA (featcal.ops);
- solves: linear modules whose statistics are equal in every task (q/k/v) share one system;
  Cholesky in featcal._C instead of LU, with diagonal jitter retries and an eigendecomposition
  pseudo-inverse as the fallback (the reference: LU, then pinv); all in float32 (float64 when
  any input is float64), results cast to each parameter's dtype;
- also served: GPT-2 `Conv1D` linears and RMSNorm weights (kind "rmsnorm"), and norms without
  a bias (weight-only update). LayerNorms without an affine have no parameters and no entry.
- with `weight_transpose=False` the bias update uses the layer's map W = stored weight^T (the
  reference multiplies the stored weight itself, which fails for non-square layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import FeatCalConfig
from ..errors import FeatCalError, Location
from ..models.adapters import CLIP_VISION
from ..models.capture import BlockContext
from ..models.modules import LINEAR, ModuleRef, calibrated_modules
from ..ops import accumulator_dtype
from ..pipeline.phases import BlockRun, accumulate, discover, new_sums
from ..pipeline.plan import BlockPlan, Group
from ..pipeline.solver import BlockSystem
from ..pipeline.state import BlockInputs
from ..pipeline.statistics import CrossMoments, LinearMoments, NormMoments, normalise

Stats = dict[str, dict[str, Tensor | str]]


@torch.no_grad()
def collect_layer_statistics(
    *,
    student_layer: nn.Module,
    expert_layer: nn.Module,
    student_inputs: Sequence[Tensor],
    expert_inputs: Sequence[Tensor],
    layer_idx: int,
    num_layers: int,
    teacher_interp_alpha: float,
) -> tuple[Stats, list[Tensor]]:
    """One task's statistics of one layer, and the expert layer's outputs.

    student_layer: layer `layer_idx` (of `num_layers`) of the merged model, not yet calibrated;
    expert_layer: the same layer of the task's expert, on the same device. Each is called as
    `layer(hidden, attention_mask=None, causal_attention_mask=None)` (a CLIP encoder layer).
    student_inputs, expert_inputs: the hidden states (batch, tokens, hidden) entering the two
    layers, one tensor per batch, on any device (moved to the layer's one batch at a time).
    teacher_interp_alpha: alpha in the teacher input x_t = alpha x_e + (1 - alpha) x_s.
    In the last layer every module but k_proj and v_proj weighs tokens 1.. by 0.01.

    Returns (stats, next_expert_inputs):
    - stats[name] for every Linear and norm of the layer, in definition order, as CPU tensors:
      {"kind": "linear", "mean_student": mu_s, "mean_teacher": mu_t, "cov_ss": G, "cross_st": C}
      or {"kind": "layernorm" | "rmsnorm", "mean_student": m, "energy_student": e}, the weighted
      means of docs/algorithm.md s.4. Modules that read one input share these tensors: do not
      modify them in place.
    - next_expert_inputs: the expert layer's output for each batch, on the CPU.
    """
    where = Location(block=layer_idx)
    if len(student_inputs) != len(expert_inputs):
        raise FeatCalError(
            f"{where}: student_inputs has {len(student_inputs)} batches but "
            f"expert_inputs has {len(expert_inputs)}"
        )
    student, expert = calibrated_modules(student_layer), calibrated_modules(expert_layer)
    if list(student) != list(expert):
        raise FeatCalError(
            f"{where}: the student and expert layers have different modules: "
            f"{list(student)} vs {list(expert)}"
        )
    if not student_inputs:
        return {}, []
    device, expert_device = _device(student_layer, "student_layer"), _device(expert_layer, "expert_layer")
    if expert_device != device:
        raise FeatCalError(
            f"{where}: student_layer is on {device} but expert_layer on {expert_device}; "
            "put both on one device"
        )
    cfg = FeatCalConfig(teacher_interp_alpha=teacher_interp_alpha, cross_method="cross", progress=False)
    dtype = accumulator_dtype(next(student_layer.parameters()).dtype)
    run = BlockRun(CLIP_VISION, layer_idx, num_layers, where, cfg, dtype, device)
    context = BlockContext((), {"attention_mask": None, "causal_attention_mask": None})
    contexts = [context] * len(student_inputs)
    inputs = BlockInputs(
        _OnDevice(student_inputs, device), _OnDevice(expert_inputs, device), contexts, contexts,
        [None] * len(student_inputs), [None] * len(student_inputs),
    )  # fmt: skip
    plan, first = discover(run, student_layer, expert_layer, inputs)
    if plan.skipped:
        raise FeatCalError(
            f"{run.where}: modules {plan.skipped} are never called in the layer's forward pass; "
            "every calibrated module must read exactly one input"
        )
    sums = new_sums(run, plan, tokens=0)  # the "cross" method yields C itself
    outputs = _HostList()
    accumulate(run, plan, student_layer, expert_layer, inputs, sums, outputs, task=None, first=first)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the copies of the outputs to the host
    moments = normalise(sums, expert, alpha=teacher_interp_alpha, where=run.where)
    return _reference_stats(student, moments), list(outputs)


class _OnDevice(Sequence):
    """A list of tensors, each served on `device` when read."""

    def __init__(self, tensors: Sequence[Tensor], device: torch.device) -> None:
        self.tensors, self.device = tensors, device

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i):
        return self.tensors[i].to(self.device)


class _HostList(list):
    """The expert layer's outputs, copied to the host as they are appended."""

    def append(self, value: Tensor) -> None:
        super().append(value.detach().to("cpu", non_blocking=True))


def _device(layer: nn.Module, what: str) -> torch.device:
    param = next(layer.parameters(), None)
    if param is None:
        raise FeatCalError(f"{what} has no parameters")
    return param.device


def _reference_stats(modules: dict[str, ModuleRef], moments: list) -> Stats:
    """Per-module dicts in the reference's format, in the layer's module order."""
    entries = {}
    for mom in moments:
        if isinstance(mom, CrossMoments):
            entry = {
                "kind": "linear",
                "mean_student": mom.mean_student.cpu(),
                "mean_teacher": mom.mean_teacher.cpu(),
                "cov_ss": mom.gram.cpu(),
                "cross_st": mom.cross.cpu(),
            }
        else:
            entry = {
                "kind": mom.group.kind,
                "mean_student": mom.mean.cpu(),
                "energy_student": mom.energy.cpu(),
            }
        for name in mom.group.names:
            entries[name] = dict(entry)
    return {name: entries[name] for name in modules if name in entries}


def merge_layer_parameters_with_featcal_stats(
    *,
    expert_param_dict: Mapping[str, Sequence[Tensor]],
    expert_featcal_stats: Sequence[Mapping[str, Mapping[str, Tensor | str]]],
    weight_transpose: bool,
    ridge_lambda: float,
    merged_params: Mapping[str, Tensor],
    base_params: Mapping[str, Tensor],
    calibrate_bias: bool,
    calibrate_layernorm: bool,
    anchor_blend_rho: float,
    covariance_eps: float,
) -> dict[str, Tensor]:
    """The calibrated parameters of one layer from every task's statistics (docs/algorithm.md s.6).

    expert_param_dict: parameter name -> one tensor per task (the experts' layer state dicts),
        tasks in the order of `expert_featcal_stats`, which holds each task's
        `collect_layer_statistics` result (or the reference's own).
    weight_transpose: True for weights stored (d_out, d_in) as nn.Linear does; False for weights
        stored (d_in, d_out) (GPT-2 Conv1D).
    ridge_lambda (lam, clamped at 0), anchor_blend_rho (rho), covariance_eps (eps): the update's
        hyperparameters; merged_params, base_params: the merged layer's state before calibration
        and the base model's, giving each parameter its anchor rho * merged + (1 - rho) * base
        where both have it (a parameter without an anchor gets no ridge term).
    calibrate_bias, calibrate_layernorm: re-solve Linear biases and norm affines (else they keep
        their merged value).

    Returns parameter name -> new value for every name of `expert_param_dict`, on the device of
    the experts' weights, in each parameter's dtype and layout: Linear weights (and biases) and
    norm affines solved, every other parameter its merged value (or the experts' mean where
    `merged_params` lacks it).
    """
    config = FeatCalConfig(
        lambda_ratio=ridge_lambda,
        anchor_blend_rho=anchor_blend_rho,
        covariance_eps=covariance_eps,
        calibrate_bias=calibrate_bias,
        calibrate_layernorm=calibrate_layernorm,
        progress=False,
    )
    tasks = len(expert_featcal_stats)
    if tasks == 0:
        raise FeatCalError("expert_featcal_stats is empty: no task statistics to merge")
    for name, values in expert_param_dict.items():
        if len(values) != tasks:
            raise FeatCalError(
                f"expert_param_dict[{name!r}] has {len(values)} tensors but expert_featcal_stats "
                f"has {tasks} tasks"
            )
    layer = _ExpertParameters(expert_param_dict, expert_featcal_stats, weight_transpose, calibrate_layernorm)
    solved = layer.solve(config, merged_params, base_params) if layer.modules else {}
    return {
        name: solved[name] if name in solved else _merged_or_mean(values, merged_params.get(name))
        for name, values in expert_param_dict.items()
    }


def _merged_or_mean(values: Sequence[Tensor], merged: Tensor | None) -> Tensor:
    return merged.detach().clone() if merged is not None else torch.stack(list(values)).mean(0)


@dataclass
class _Parameters:
    """One module's parameters as ModuleRef reads them: weight (d_out, d_in) or gamma, and bias."""

    weight: Tensor
    bias: Tensor | None


class _ExpertParameters:
    """The experts' parameters of one layer with their statistics, as featcal's solver takes them.

    Linear weights are handed to the solver as W (d_out, d_in) and returned in the stored layout.
    The solve runs on the device of the first solved weight, in float64 if any of its inputs is
    float64 and in float32 otherwise.
    """

    def __init__(self, params, stats, weight_transpose: bool, calibrate_norms: bool) -> None:
        self.params, self.stats, self.transpose = params, stats, not weight_transpose
        # module -> kind, for every module with a weight or bias among the parameters
        self.kinds: dict[str, str] = {}
        for name in params:
            module, _, suffix = name.rpartition(".")
            if suffix in ("weight", "bias") and module not in self.kinds:
                self.kinds[module] = self._kind(module, name)
        self.modules = [
            m
            for m, kind in self.kinds.items()
            if f"{m}.weight" in params and (kind == LINEAR or calibrate_norms)
        ]
        if self.modules:
            self.device = params[f"{self.modules[0]}.weight"][0].device
            inputs = [v for m in self.modules for v in params[f"{m}.weight"]]
            inputs += [v for s in stats for m in self.modules for v in s[m].values() if isinstance(v, Tensor)]
            self.dtype = torch.float64 if any(v.dtype == torch.float64 for v in inputs) else torch.float32

    def _kind(self, module: str, param: str) -> str:
        kinds = set()
        for t, task_stats in enumerate(self.stats):
            if module not in task_stats:
                raise FeatCalError(
                    f"expert_featcal_stats[{t}] has no statistics for module {module!r}, whose "
                    f"parameter {param!r} is in expert_param_dict"
                )
            kinds.add(task_stats[module].get("kind"))
        if len(kinds) != 1 or not kinds <= {LINEAR, "layernorm", "rmsnorm"}:
            raise FeatCalError(
                f"module {module!r}: statistics kind {sorted(map(str, kinds))} in the tasks' "
                "statistics; expected one of 'linear', 'layernorm', 'rmsnorm' for every task"
            )
        return kinds.pop()

    def _flip(self, module: str, which: str, value: Tensor) -> Tensor:
        """A Linear weight between the stored layout and (d_out, d_in); anything else as it is."""
        return value.mT if self.transpose and which == "weight" and self.kinds[module] == LINEAR else value

    def _ref(self, module: str, t: int) -> ModuleRef:
        """Task t's parameters of `module`, checked for shape."""
        weight = self.params[f"{module}.weight"][t]
        bias = self.params.get(f"{module}.bias")
        bias = None if bias is None else bias[t]
        if self.kinds[module] == LINEAR and weight.dim() != 2:
            raise FeatCalError(f"{module}.weight of task {t} has shape {tuple(weight.shape)}; expected 2-D")
        weight = self._flip(module, "weight", weight)
        if bias is not None and tuple(bias.shape) != tuple(weight.shape[:1]):
            raise FeatCalError(
                f"{module}.bias of task {t} has shape {tuple(bias.shape)} but its weight gives "
                f"{weight.shape[0]} outputs (weight_transpose={not self.transpose})"
            )
        return ModuleRef(module, self.kinds[module], _Parameters(weight, bias))

    def _stat(self, t: int, module: str, key: str, shape: tuple[int, ...]) -> Tensor:
        """expert_featcal_stats[t][module][key], checked to have `shape`, as the solve's dtype."""
        value = self.stats[t][module].get(key)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            got = (
                tuple(value.shape)
                if isinstance(value, Tensor)
                else "missing"
                if value is None
                else type(value)
            )
            raise FeatCalError(
                f"expert_featcal_stats[{t}][{module!r}][{key!r}] is {got}; expected a tensor of "
                f"shape {shape} for the parameters of {module!r} (weight_transpose={not self.transpose})"
            )
        return value.to(dtype=self.dtype, device=self.device)

    def solve(self, config: FeatCalConfig, merged: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> dict:
        """Parameter name -> solved value, in the parameter's layout and dtype."""
        layers = [{m: self._ref(m, t) for m in self.modules} for t in range(len(self.stats))]
        plan = BlockPlan(self._groups(layers[0]), last="")
        system = BlockSystem.zeros(plan, self.dtype, self.device)
        for t, layer in enumerate(layers):
            system.fold(self._moments(t, plan, layer), layer, config.covariance_eps)
        anchors = {m: self._anchors(m, merged, base, config.anchor_blend_rho) for m in self.modules}
        solved = {}
        for module, which, value in system.solve(anchors, config):
            name = f"{module}.{which}"
            solved[name] = self._flip(module, which, value).to(self.params[name][0].dtype).contiguous()
        return solved

    def _groups(self, refs: dict[str, ModuleRef]) -> list[Group]:
        """Linear modules with the same input statistics in every task share a group (one system)."""
        groups: list[Group] = []
        for module in self.modules:
            ref = refs[module]
            same = (
                g
                for g in groups
                if ref.kind == LINEAR and g.kind == LINEAR and self._same_inputs(g.leader.name, module)
            )
            group = next(same, None)
            if group is None:
                groups.append(Group(ref.kind, [ref], None))
            else:
                group.members.append(ref)
        return groups

    def _same_inputs(self, a: str, b: str) -> bool:
        for task_stats in self.stats:
            for key in ("cov_ss", "mean_student"):
                x, y = task_stats[a].get(key), task_stats[b].get(key)
                if x is y:
                    continue
                if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
                    return False
                if (x.shape, x.dtype, x.device) != (y.shape, y.dtype, y.device) or not torch.equal(x, y):
                    return False
        return True

    def _moments(self, t: int, plan: BlockPlan, layer: dict[str, ModuleRef]) -> list:
        """Task t's statistics in the solver's form: per linear member C_t W_t^T and W_t mu_t."""
        moments = []
        for group in plan.groups:
            lead, d = group.leader.name, group.d_in
            if group.kind != LINEAR:
                mean, energy = (
                    self._stat(t, lead, "mean_student", (d,)),
                    self._stat(t, lead, "energy_student", (d,)),
                )
                moments.append(NormMoments(group, mean, energy))
                continue
            rhs, teacher = [], []
            for m in group.members:
                W, _ = layer[m.name].params(self.dtype, self.device)
                rhs.append(self._stat(t, m.name, "cross_st", (d, d)) @ W.mT)
                teacher.append(W @ self._stat(t, m.name, "mean_teacher", (d,)))
            gram, mean = self._stat(t, lead, "cov_ss", (d, d)), self._stat(t, lead, "mean_student", (d,))
            moments.append(LinearMoments(group, gram, mean, rhs, teacher))
        return moments

    def _anchors(self, module: str, merged, base, rho: float) -> tuple[Tensor | None, Tensor | None]:
        """rho * merged + (1 - rho) * base of the module's weight (as (d_out, d_in)) and bias, each
        None unless both the merged and the base parameters are given."""
        found = []
        for which in ("weight", "bias"):
            name = f"{module}.{which}"
            if name not in merged or name not in base:
                found.append(None)
                continue
            m, b = (x.to(dtype=self.dtype, device=self.device) for x in (merged[name], base[name]))
            found.append(self._flip(module, which, rho * m + (1 - rho) * b))
        return found[0], found[1]
