"""An independent float64 implementation of docs/algorithm.md, written for the tests.

It follows the page literally and shares no code with featcal: activations of every module
are kept per batch, each module has its own statistics (no shared Grams, no folding), the
cross moment C_t is formed explicitly and every system is solved by LU (torch.linalg.solve).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny_models import Family
from torch import nn
from transformers.pytorch_utils import Conv1D


def _first_block_inputs(family: Family, model: nn.Module, batch: dict):
    """(hidden, args, kwargs) that the model passes to its first block."""
    seen = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    handle = family.blocks(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        family.backbone(model)(**batch, **family.call_kwargs)
    finally:
        handle.remove()
    args = seen["args"]
    return args[0], args[1:], seen["kwargs"]


def _run(block: nn.Module, hidden, args, kwargs):
    out = block(hidden, *args, **kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _is_linear(module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _is_rms(module) -> bool:
    return isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


def _targets(block: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.Linear, Conv1D, nn.LayerNorm)
    return {n: m for n, m in block.named_modules() if n and (isinstance(m, kinds) or _is_rms(m))}


def _normalise(module, x):
    if _is_rms(module):
        eps = module.eps if isinstance(module, nn.RMSNorm) else module.variance_epsilon
        return x / (x.square().mean(-1, keepdim=True) + eps).sqrt()
    return F.layer_norm(x, module.normalized_shape, eps=module.eps)


def _keep(cache: dict, name: str):
    """A pre-hook that stores the module's input in cache[name]."""
    return lambda module, args: cache.__setitem__(name, args[0])


def _token_weights(family, name, layer, num_layers, x, mask):
    w = torch.ones(x.shape[:2], dtype=torch.float64)
    if family.class_focus and layer == num_layers - 1 and not name.endswith(("k_proj", "v_proj")):
        w[:, 1:] = 0.01
    if mask is not None:
        w = w * mask.to(torch.float64)
    return w.reshape(-1)


def _steps(family, block, targets, hidden, args, kwargs, sequential: str) -> list[list[str]]:
    """The module names of each step of a block, in call order: all at once ("off"), one step per
    set of modules reading the same tensor ("group"), or split where family.sublayers open one."""
    seen, handles = [], []
    for name, module in targets.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, a[0]))))
    try:
        _run(block, hidden, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    if sequential == "off":
        return [[name for name, _ in seen]]
    steps, last_input = [], None
    for name, x in seen:
        if sequential == "group":
            opens = x is not last_input
        else:
            opens = not steps or name in family.sublayers
        if opens:
            steps.append([])
        steps[-1].append(name)
        last_input = x
    return steps


@torch.no_grad()
def reference_calibrate(
    family: Family, merged, base, experts: dict, data: dict, cfg, sequential: str = "off"
) -> None:
    """Calibrate `merged` (float64) in place, exactly as docs/algorithm.md states; with
    `sequential` (s.12), each step's statistics are taken from the block as the steps before it
    left it (the whole block is run again for each step)."""
    lam = max(cfg.lambda_ratio, 0.0)
    eps, rho, alpha = cfg.covariance_eps, cfg.anchor_blend_rho, cfg.teacher_interp_alpha
    tasks = list(experts)
    student, expert, ctx, masks = {}, {}, {}, {}
    for t in tasks:
        student[t], expert[t], ctx[t], masks[t] = [], [], [], []
        for batch in data[t]:
            hs, args, kwargs = _first_block_inputs(family, merged, batch)
            he, eargs, ekwargs = _first_block_inputs(family, experts[t], batch)
            student[t].append(hs)
            expert[t].append(he)
            ctx[t].append(((args, kwargs), (eargs, ekwargs)))
            masks[t].append(batch.get("attention_mask"))

    merged_blocks, base_blocks = family.blocks(merged), family.blocks(base)
    num_layers = len(merged_blocks)
    for layer in range(num_layers):
        block = merged_blocks[layer]
        targets = _targets(block)
        m0 = {k: v.clone() for k, v in block.state_dict().items()}
        b0 = base_blocks[layer].state_dict()
        t0 = tasks[0]
        steps = _steps(family, block, targets, student[t0][0], *ctx[t0][0][0], sequential)
        expert_states = [family.blocks(experts[t])[layer].state_dict() for t in tasks]
        for names in steps:
            stats, next_expert = _statistics(
                family, layer, num_layers, block, names, experts, student, expert, ctx, masks, alpha
            )
            new = _solve(block, names, stats, expert_states, m0, b0, lam, eps, rho, cfg)
            block.load_state_dict(new, strict=False)
        for t in tasks:
            student[t] = [_run(block, h, *ctx[t][i][0]) for i, h in enumerate(student[t])]
        expert = next_expert


def _statistics(family, layer, num_layers, block, names, experts, student, expert, ctx, masks, alpha):
    """Per module of `names`, per task: G, C, mu_s, mu_t (linear) or m, e (norm), from a full
    forward of the block as it is now; and each expert block's outputs."""
    targets = {n: _targets(block)[n] for n in names}
    stats = {name: [] for name in targets}
    next_expert = {}
    for t in experts:
        eblock = family.blocks(experts[t])[layer]
        etargets = _targets(eblock)
        acc = {name: {} for name in targets}
        next_expert[t] = []
        for i, (hs, he) in enumerate(zip(student[t], expert[t])):
            cache_s, cache_e, handles = {}, {}, []
            for name in targets:
                handles.append(targets[name].register_forward_pre_hook(_keep(cache_s, name)))
                handles.append(etargets[name].register_forward_pre_hook(_keep(cache_e, name)))
            (sargs, skw), (eargs, ekw) = ctx[t][i]
            _run(block, hs, sargs, skw)
            next_expert[t].append(_run(eblock, he, eargs, ekw))
            for h in handles:
                h.remove()
            for name, module in targets.items():
                xs, xe = cache_s[name], cache_e[name]
                w = _token_weights(family, name, layer, num_layers, xs, masks[t][i])
                xs2, xe2 = xs.reshape(-1, xs.shape[-1]), xe.reshape(-1, xe.shape[-1])
                a = acc[name]
                a["sw"] = a.get("sw", 0.0) + w.sum()
                if _is_linear(module):
                    xt2 = alpha * xe2 + (1 - alpha) * xs2
                    for key, value in (
                        ("sxs", w @ xs2),
                        ("sxt", w @ xt2),
                        ("G", xs2.T @ (w[:, None] * xs2)),
                        ("C", xs2.T @ (w[:, None] * xt2)),
                    ):
                        a[key] = a.get(key, 0.0) + value
                else:
                    z = _normalise(module, xs2)
                    a["sz"] = a.get("sz", 0.0) + w @ z
                    a["sz2"] = a.get("sz2", 0.0) + w @ z.square()
        for name, a in acc.items():
            sw = a["sw"]
            if _is_linear(targets[name]):
                stats[name].append(dict(G=a["G"] / sw, C=a["C"] / sw, mu_s=a["sxs"] / sw, mu_t=a["sxt"] / sw))
            else:
                stats[name].append(dict(m=a["sz"] / sw, e=a["sz2"] / sw))
    return stats, next_expert


def _solve(block, names, stats, expert_states, m0, b0, lam, eps, rho, cfg) -> dict:
    """The new parameters of the modules `names` (s.6), anchored at the block as given (m0)."""
    targets = _targets(block)
    new = {}

    def anchor(p):
        return rho * m0[p] + (1 - rho) * b0[p]

    for name in names:
        module = targets[name]
        # Conv1D stores W transposed: work with W (d_out, d_in) and store it back transposed
        flip = (lambda t: t.T) if isinstance(module, Conv1D) else (lambda t: t)
        ws = [flip(s[f"{name}.weight"]) for s in expert_states]
        if _is_linear(module):
            st = stats[name]
            norms = [max(torch.linalg.norm(s["G"]).item(), eps) for s in st]
            d = st[0]["G"].shape[0]
            A = sum(s["G"] / n for s, n in zip(st, norms)) + lam * torch.eye(d, dtype=torch.float64)
            if eps > 0:
                A = A + eps * torch.eye(d, dtype=torch.float64)
            B = sum((s["C"] / n) @ W.T for s, n, W in zip(st, norms, ws))
            B = B + lam * flip(anchor(f"{name}.weight")).T
            W_new = torch.linalg.solve(A, B).T
            new[f"{name}.weight"] = flip(W_new)
            if module.bias is not None and cfg.calibrate_bias:
                bs = [s[f"{name}.bias"] for s in expert_states]
                num = sum(
                    (b + W @ s["mu_t"] - W_new @ s["mu_s"]) / n for b, W, s, n in zip(bs, ws, st, norms)
                )
                den = sum(1 / n for n in norms)
                new[f"{name}.bias"] = (num + lam * anchor(f"{name}.bias")) / (den + lam)
        elif cfg.calibrate_layernorm and getattr(module, "bias", None) is None:
            st = stats[name]
            num = sum(s["e"] * g for s, g in zip(st, ws)) + lam * anchor(f"{name}.weight")
            new[f"{name}.weight"] = num / (sum(s["e"] for s in st) + lam)
        elif cfg.calibrate_layernorm:
            st = stats[name]
            cs = [s[f"{name}.bias"] for s in expert_states]
            a11 = sum(s["e"] for s in st) + lam
            a12 = sum(s["m"] for s in st)
            a22 = len(st) + lam
            r1 = sum(s["e"] * g + s["m"] * c for s, g, c in zip(st, ws, cs))
            r2 = sum(s["m"] * g + c for s, g, c in zip(st, ws, cs))
            r1 = r1 + lam * anchor(f"{name}.weight")
            r2 = r2 + lam * anchor(f"{name}.bias")
            det = torch.clamp(a11 * a22 - a12**2, min=eps)
            new[f"{name}.weight"] = (a22 * r1 - a12 * r2) / det
            new[f"{name}.bias"] = (a11 * r2 - a12 * r1) / det
    return new
