"""The closed-form updates of a block (featcal-math.md s.4), folded task by task.

With n_t = max(||G_t||_F, eps), s_t = 1 / n_t and anchor(p) = rho * M0[p] + (1 - rho) * base[p]:

    A = sum_t s_t G_t + (lam + eps) I
    B = sum_t s_t C_t W_t^T + lam anchor(W)^T                 W* = (A^{-1} B)^T
    b* = (sum_t s_t (b_t + W_t mu_t) - W* sum_t s_t mu_s + lam anchor(b)) / (sum_t s_t + lam)

Members of a group share A and are solved together with concatenated right-hand sides.
LayerNorm affine: the per-channel 2x2 system of s.4; weight-only norms (RMSNorm, LayerNorm
without bias): g* = (sum_t e_t g_t + lam g_a) / (sum_t e_t + lam).
Only one task's statistics are alive at a time: `add` folds them into these sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..config import FeatCalConfig
from ..errors import FeatCalError
from ..models.modules import LINEAR, ModuleRef
from .statistics import BlockPlan, LinearMoments, NormMoments


class BlockSystem:
    """Sums over tasks of the statistics of one block, and their solution."""

    def __init__(
        self, plan: BlockPlan, config: FeatCalConfig, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.plan, self.config, self.dtype, self.device = plan, config, dtype, device
        self.tasks = 0
        self.sums: list[dict] = []
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        for group in plan.groups:
            d = group.d_in
            if group.kind == LINEAR:
                self.sums.append(
                    {
                        "A": zeros(d, d),
                        "B": [zeros(d, m.d_out) for m in group.members],
                        "R": [zeros(m.d_out) for m in group.members],
                        "V": zeros(d),
                        "s": zeros(),
                    }
                )
            else:
                self.sums.append(
                    {
                        "energy": zeros(d),
                        "mean": zeros(d),
                        "r1": [zeros(d) for _ in group.members],
                        "r2": [zeros(d) for _ in group.members],
                    }
                )

    def add(self, moments: list[LinearMoments | NormMoments], expert: dict[str, ModuleRef]) -> None:
        """Fold one task's statistics, with that task's expert parameters."""
        self.tasks += 1
        eps = self.config.covariance_eps
        for sums, mom in zip(self.sums, moments):
            members = mom.group.members
            if isinstance(mom, NormMoments):
                sums["energy"] += mom.energy
                sums["mean"] += mom.mean
                for k, m in enumerate(members):
                    g, c = expert[m.name].params(self.dtype, self.device)
                    sums["r1"][k] += mom.energy * g
                    sums["r2"][k] += mom.mean * g
                    if c is not None:
                        sums["r1"][k] += mom.mean * c
                        sums["r2"][k] += c
                continue
            norm = ops.assemble(sums["A"], mom.gram, eps)
            if norm == 0:
                raise FeatCalError(
                    f"the inputs of module(s) {mom.group.names} are all zero for a task; "
                    "set covariance_eps > 0 to solve this block"
                )
            scale = 1.0 / norm
            sums["V"].add_(mom.mean_student, alpha=scale)
            sums["s"] += scale
            for k, m in enumerate(members):
                sums["B"][k].add_(mom.rhs[k], alpha=scale)
                _, b = expert[m.name].params(self.dtype, self.device)
                teacher = mom.teacher_out[k] if b is None else mom.teacher_out[k] + b
                sums["R"][k].add_(teacher, alpha=scale)

    def solve(
        self, merged: dict[str, ModuleRef], base: dict[str, ModuleRef] | None
    ) -> list[tuple[ModuleRef, str, Tensor]]:
        """New (module, 'weight' | 'bias', value) of every calibrated parameter of the merged block.

        The anchor is taken from the merged block as it is now (before any update) and the base.
        Call once: the sums become the right-hand sides, in place.
        """
        anchors = {
            m.name: self._anchors(merged[m.name], None if base is None else base[m.name])
            for group in self.plan.groups
            for m in group.members
        }
        return [(merged[name], which, value) for name, which, value in self.solve_with_anchors(anchors)]

    def solve_with_anchors(
        self, anchors: dict[str, tuple[Tensor | None, Tensor | None]]
    ) -> list[tuple[str, str, Tensor]]:
        """New (module name, 'weight' | 'bias', value) of every calibrated parameter.

        anchors[name]: (anchor of W (d_out, d_in) or of gamma, anchor of the bias), each None where
        that parameter has no anchor (then it gets no ridge term). Which members have a bias, and
        their d_out, are read from the plan's module references. Call once.
        """
        cfg = self.config
        lam, eps = cfg.ridge, cfg.covariance_eps
        updates = []
        for group, sums in zip(self.plan.groups, self.sums):
            group_anchors = [anchors[name] for name in group.names]
            if group.kind == LINEAR:
                updates += self._solve_linear(sums, group.members, group_anchors, lam, eps)
            elif cfg.calibrate_layernorm:
                updates += self._solve_norm(sums, group.members, group_anchors, lam, eps)
        return updates

    def _solve_linear(self, sums, refs, anchors, lam, eps):
        rhs = [B if a is None else B.add_(a.mT, alpha=lam) for B, (a, _) in zip(sums["B"], anchors)]
        X = ops.ridge_solve(sums["A"], rhs, lam + (eps if eps > 0 else 0.0))
        updates, start = [], 0
        for k, ref in enumerate(refs):
            W = X[:, start : start + ref.d_out].mT
            start += ref.d_out
            updates.append((ref.name, "weight", W))
            if not self.config.calibrate_bias or ref.bias() is None:
                continue
            num, den = sums["R"][k] - W @ sums["V"], sums["s"]
            bias_anchor = anchors[k][1]
            if bias_anchor is not None:
                num, den = num + lam * bias_anchor, den + lam
            updates.append((ref.name, "bias", num / den.clamp_min(torch.finfo(self.dtype).eps)))
        return updates

    def _solve_norm(self, sums, refs, anchors, lam, eps):
        updates = []
        for k, ref in enumerate(refs):
            g_anchor, c_anchor = anchors[k]
            lam_g = lam if g_anchor is not None else 0.0
            r1 = sums["r1"][k] + (lam * g_anchor if g_anchor is not None else 0.0)
            if ref.bias() is None:
                den = (sums["energy"] + lam_g).clamp_min(torch.finfo(self.dtype).eps)
                updates.append((ref.name, "weight", r1 / den))
                continue
            lam_c = lam if c_anchor is not None else 0.0
            r2 = sums["r2"][k] + (lam * c_anchor if c_anchor is not None else 0.0)
            a11, a12, a22 = sums["energy"] + lam_g, sums["mean"], self.tasks + lam_c
            det = (a11 * a22 - a12.square()).clamp_min(eps)
            updates.append((ref.name, "weight", (a22 * r1 - a12 * r2) / det))
            updates.append((ref.name, "bias", (a11 * r2 - a12 * r1) / det))
        return updates

    def _anchors(self, ref: ModuleRef, base: ModuleRef | None) -> tuple[Tensor | None, Tensor | None]:
        """rho * merged + (1 - rho) * base for the module's weight (d_out, d_in) and bias (or None)."""
        if base is None:
            return None, None
        rho = self.config.anchor_blend_rho
        (w, b), (base_w, base_b) = ref.params(self.dtype, self.device), base.params(self.dtype, self.device)
        bias = None if b is None or base_b is None else rho * b + (1 - rho) * base_b
        return rho * w + (1 - rho) * base_w, bias
