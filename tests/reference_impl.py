"""An independent float64 implementation of docs/algorithm.md, written for the tests.

It follows the page literally and shares no code with featcal: activations of every module
are kept per batch, each module has its own statistics (no shared Grams, no folding), the
cross moment C_t is formed explicitly and every system is solved by LU (torch.linalg.solve).
The arguments of every block (masks of its layer type, rotary embeddings, T5's position biases
and encoder output) come from a full forward of the model, hooked at every block. A routed MoE
expert e is two modules of its own, `experts.gate_up_proj[e]` and `experts.down_proj[e]`, on
the tokens the merged model routes to it. T5 is two stages: the encoder's blocks, then the
decoder's, which read the calibrated encoder's output (each expert its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tiny_models import Family
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass
class _Stage:
    """The blocks of one stage, how a batch enters them, and what the next stage reads."""

    backbone: callable  # model -> the module to call
    blocks: callable  # model -> its blocks
    call: callable  # (batch, previous stage's output or None) -> backbone kwargs
    output: callable  # (model, last block's output) -> the next stage's input
    mask: callable  # batch -> (batch, tokens) mask of the stage's hidden states, or None
    memory_mask: callable = lambda batch: None
    reads_memory: callable = lambda name: False


def _stages(family: Family, model) -> list[_Stage]:
    if type(model).__name__ in ("T5Model", "T5ForConditionalGeneration"):
        return [
            _Stage(
                lambda m: m.encoder,
                lambda m: m.encoder.block,
                lambda b, prev: {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
                lambda m, h: m.encoder.dropout(m.encoder.final_layer_norm(h)),
                lambda b: b.get("attention_mask"),
            ),
            _Stage(
                lambda m: m.decoder,
                lambda m: m.decoder.block,
                lambda b, prev: {
                    "input_ids": b["decoder_input_ids"],
                    "attention_mask": b["decoder_attention_mask"],
                    "encoder_hidden_states": prev,
                    "encoder_attention_mask": b["attention_mask"],
                },
                lambda m, h: h,
                lambda b: b.get("decoder_attention_mask"),
                memory_mask=lambda b: b.get("attention_mask"),
                reads_memory=lambda name: name.endswith(("EncDecAttention.k", "EncDecAttention.v")),
            ),
        ]
    return [
        _Stage(
            family.backbone,
            family.blocks,
            lambda b, prev: {**b, **family.call_kwargs},
            lambda m, h: h,
            lambda b: b.get("attention_mask"),
        )
    ]


def _block_inputs(stage: _Stage, model, batch, previous):
    """(hidden states of the first block, [(args, kwargs) of every block]) from one forward."""
    seen, handles = {}, []
    for i, block in enumerate(stage.blocks(model)):

        def hook(module, args, kwargs, i=i):
            seen[i] = args, dict(kwargs)

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        stage.backbone(model)(**stage.call(batch, previous), use_cache=False)
    except TypeError:  # a backbone without use_cache
        stage.backbone(model)(**stage.call(batch, previous))
    finally:
        for h in handles:
            h.remove()
    hidden = seen[0][0][0]
    return hidden, [(seen[i][0][1:], seen[i][1]) for i in range(len(seen))]


def _run(block: nn.Module, hidden, args, kwargs):
    out = block(hidden, *args, **kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _is_router(module) -> bool:
    return type(module).__name__.endswith("TopKRouter")


def _is_linear(module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or _is_router(module)


def _is_rms(module) -> bool:
    return isinstance(module, nn.RMSNorm) or type(module).__name__.endswith(("RMSNorm", "T5LayerNorm"))


def _is_offset(module) -> bool:
    """Gemma's norms scale by (1 + w)."""
    return type(module).__name__.startswith("Gemma") and _is_rms(module)


def _is_experts(module) -> bool:
    return type(module).__name__.endswith("Experts") and hasattr(module, "gate_up_proj")


def _targets(block: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in block.named_modules()
        if n and (_is_linear(m) or isinstance(m, nn.LayerNorm) or _is_rms(m) or _is_experts(m))
    }


def _normalise(module, x):
    if _is_rms(module):
        eps = getattr(module, "variance_epsilon", None) or module.eps
        return x / (x.square().mean(-1, keepdim=True) + eps).sqrt()
    return F.layer_norm(x, module.normalized_shape, eps=module.eps)


def _token_weights(family, name, layer, num_layers, x, mask):
    """One weight per row of x.reshape(-1, d): its (batch, token)'s padding mask (and focus)."""
    if x.dim() == 2:  # (batch * tokens, d), as MoE blocks flatten their input
        return torch.ones(x.shape[0], dtype=torch.float64) if mask is None else mask.reshape(-1).double()
    axis = family.token_axis(name) if x.dim() == 4 else 1
    w = torch.ones(x.shape[0], x.shape[axis], dtype=torch.float64)
    if family.class_focus and layer == num_layers - 1 and not name.endswith(("k_proj", "v_proj")):
        w[:, 1:] = 0.01
    if mask is not None:
        w = w * mask.to(torch.float64)
    if x.dim() == 4:  # the same weight for every head of a token
        w = w[:, :, None] if axis == 1 else w[:, None, :]
        w = w.expand(x.shape[:-1])
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
) -> dict:
    """Calibrate `merged` (float64) in place, exactly as docs/algorithm.md states; with
    `sequential` (s.12), each step's statistics are taken from the block as the steps before it
    left it (the whole block is run again for each step). Returns the routed experts it left
    merged (fewer tokens than cfg.min_expert_tokens): (stage, block, name) -> tokens."""
    tasks = list(experts)
    previous = {t: [None] * len(data[t]) for t in tasks}
    previous_expert = {t: [None] * len(data[t]) for t in tasks}
    low_coverage = {}
    for k, stage in enumerate(_stages(family, merged)):
        student, expert, ctx, masks = {}, {}, {}, {}
        for t in tasks:
            student[t], expert[t], ctx[t], masks[t] = [], [], [], []
            for i, batch in enumerate(data[t]):
                hs, sargs = _block_inputs(stage, merged, batch, previous[t][i])
                he, eargs = _block_inputs(stage, experts[t], batch, previous_expert[t][i])
                student[t].append(hs)
                expert[t].append(he)
                ctx[t].append((sargs, eargs))
                masks[t].append((stage.mask(batch), stage.memory_mask(batch)))
        low = _calibrate_stage(
            family, stage, merged, base, experts, student, expert, ctx, masks, cfg, sequential
        )
        low_coverage.update({(k, *key): n for key, n in low.items()})
        for t in tasks:
            previous[t] = [stage.output(merged, h) for h in student[t]]
            previous_expert[t] = [stage.output(experts[t], h) for h in expert[t]]
    return low_coverage


def _calibrate_stage(family, stage, merged, base, experts, student, expert, ctx, masks, cfg, sequential):
    """Calibrate the stage's blocks in order; `student` and `expert` end as their last outputs."""
    lam = max(cfg.lambda_ratio, 0.0)
    eps, rho, alpha = cfg.covariance_eps, cfg.anchor_blend_rho, cfg.teacher_interp_alpha
    tasks = list(experts)
    merged_blocks, base_blocks = stage.blocks(merged), stage.blocks(base)
    num_layers = len(merged_blocks)
    low_coverage = {}
    for layer in range(num_layers):
        block = merged_blocks[layer]
        targets = _targets(block)
        m0 = {k: v.clone() for k, v in block.state_dict().items()}
        b0 = base_blocks[layer].state_dict()
        t0 = tasks[0]
        args, kwargs = ctx[t0][0][0][layer]
        steps = _steps(family, block, targets, student[t0][0], args, kwargs, sequential)
        expert_states = {t: stage.blocks(experts[t])[layer].state_dict() for t in tasks}
        for names in steps:
            stats, next_expert = _statistics(
                family, stage, layer, num_layers, block, names, experts, student, expert, ctx, masks, alpha
            )
            new, low = _solve(block, names, stats, expert_states, m0, b0, lam, eps, rho, cfg)
            block.load_state_dict(new, strict=False)
            low_coverage.update({(layer, name): n for name, n in low.items()})
        for t in tasks:
            student[t][:] = [_run(block, h, *ctx[t][i][0][layer]) for i, h in enumerate(student[t])]
            expert[t][:] = next_expert[t]
    return low_coverage


def _keep(cache: dict, name: str):
    """A pre-hook that stores the module's (args, kwargs) in cache[name]."""
    return lambda module, args, kwargs: cache.__setitem__(name, (args, kwargs))


def _routed_rows(routes, mask_rows, e):
    """Rows routed to expert e with nonzero weight, and their weights."""
    rows = (routes == e).any(-1) & (mask_rows > 0)
    return rows.nonzero().squeeze(1), mask_rows[rows]


def _expert_hidden(weight_gate_up, act, x):
    gate, up = (x @ weight_gate_up.T).chunk(2, dim=-1)
    return act(gate) * up


def _add_moments(a: dict, w, xs2, xe2, alpha):
    xt2 = alpha * xe2 + (1 - alpha) * xs2
    a["sw"] = a.get("sw", 0.0) + w.sum()
    for key, value in (
        ("sxs", w @ xs2),
        ("sxt", w @ xt2),
        ("G", xs2.T @ (w[:, None] * xs2)),
        ("C", xs2.T @ (w[:, None] * xt2)),
    ):
        a[key] = a.get(key, 0.0) + value


def _statistics(family, stage, layer, num_layers, block, names, experts, student, expert, ctx, masks, alpha):
    """Per module of `names` (a routed expert's maps by their own names), per task: G, C, mu_s,
    mu_t (linear) or m, e (norm), from a full forward of the block as it is now; and each expert
    block's outputs."""
    all_targets = _targets(block)
    targets = {n: all_targets[n] for n in names}
    stats = {}
    next_expert = {}
    for t in experts:
        eblock = stage.blocks(experts[t])[layer]
        etargets = _targets(eblock)
        acc = {}
        next_expert[t] = []
        for i, (hs, he) in enumerate(zip(student[t], expert[t])):
            cache_s, cache_e, handles = {}, {}, []
            for name in targets:

                def keep(cache, name):
                    return lambda module, args, kwargs: cache.__setitem__(name, (args, kwargs))

                handles.append(targets[name].register_forward_pre_hook(keep(cache_s, name), with_kwargs=True))
                handles.append(
                    etargets[name].register_forward_pre_hook(keep(cache_e, name), with_kwargs=True)
                )
            sctx, ectx = ctx[t][i][0][layer], ctx[t][i][1][layer]
            _run(block, hs, *sctx)
            next_expert[t].append(_run(eblock, he, *ectx))
            for h in handles:
                h.remove()
            mask, memory_mask = masks[t][i]
            for name, module in targets.items():
                (sargs, skw), (eargs, _) = cache_s[name], cache_e[name]
                xs, xe = sargs[0] if sargs else skw["hidden_states"], eargs[0] if eargs else None
                if xe is None:
                    xe = cache_e[name][1]["hidden_states"]
                token_mask = memory_mask if stage.reads_memory(name) else mask
                w = _token_weights(family, name, layer, num_layers, xs, token_mask)
                xs2, xe2 = xs.reshape(-1, xs.shape[-1]), xe.reshape(-1, xe.shape[-1])
                if _is_experts(module):
                    routes = sargs[1] if len(sargs) > 1 else skw["top_k_index"]
                    eexperts = etargets[name]
                    for e in range(module.gate_up_proj.shape[0]):
                        rows, we = _routed_rows(routes, w, e)
                        if rows.numel() == 0:
                            continue
                        xs_e, xe_e = xs2[rows], xe2[rows]
                        _add_moments(acc.setdefault(f"{name}.gate_up_proj[{e}]", {}), we, xs_e, xe_e, alpha)
                        hs_e = _expert_hidden(module.gate_up_proj[e], module.act_fn, xs_e)
                        he_e = _expert_hidden(eexperts.gate_up_proj[e], eexperts.act_fn, xe_e)
                        _add_moments(acc.setdefault(f"{name}.down_proj[{e}]", {}), we, hs_e, he_e, alpha)
                    continue
                keep_rows = w > 0  # padding is not read at all (a model may leave NaN there)
                w, xs2, xe2 = w[keep_rows], xs2[keep_rows], xe2[keep_rows]
                a = acc.setdefault(name, {})
                if _is_linear(module):
                    _add_moments(a, w, xs2, xe2, alpha)
                else:
                    z = _normalise(module, xs2)
                    a["sw"] = a.get("sw", 0.0) + w.sum()
                    a["sz"] = a.get("sz", 0.0) + w @ z
                    a["sz2"] = a.get("sz2", 0.0) + w @ z.square()
        for name, a in acc.items():
            sw = a["sw"]
            if "G" in a:
                moments = dict(G=a["G"] / sw, C=a["C"] / sw, mu_s=a["sxs"] / sw, mu_t=a["sxt"] / sw, n=sw)
            else:
                moments = dict(m=a["sz"] / sw, e=a["sz2"] / sw)
            stats.setdefault(name, {})[t] = moments
    return stats, next_expert


def _linear_update(st, ws, anchor_w, lam, eps):
    """W* of s.6 from per-task statistics st and expert weights ws (matching lists)."""
    norms = [max(torch.linalg.norm(s["G"]).item(), eps) for s in st]
    d = st[0]["G"].shape[0] if st else anchor_w.shape[1]
    A = sum((s["G"] / n for s, n in zip(st, norms)), torch.zeros(d, d, dtype=torch.float64))
    A = A + lam * torch.eye(d, dtype=torch.float64)
    if eps > 0:
        A = A + eps * torch.eye(d, dtype=torch.float64)
    B = sum(((s["C"] / n) @ W.T for s, n, W in zip(st, norms, ws)), lam * anchor_w.T)
    return torch.linalg.solve(A, B).T, norms


def _solve(block, names, stats, expert_states, m0, b0, lam, eps, rho, cfg):
    """The new parameters of the modules `names` (s.6), anchored at the block as given (m0), and
    the routed experts left merged for want of tokens (name -> tokens)."""
    targets = _targets(block)
    new, low = {}, {}

    def anchor(p):
        return rho * m0[p] + (1 - rho) * b0[p]

    for name in names:
        module = targets[name]
        if _is_experts(module):
            for part in ("gate_up_proj", "down_proj"):
                key = f"{name}.{part}"
                fused = new.setdefault(key, m0[key].clone())
                for e in range(fused.shape[0]):
                    per_task = stats.get(f"{key}[{e}]", {})
                    tokens = sum(float(s["n"]) for s in per_task.values())
                    if tokens < cfg.min_expert_tokens:
                        low[f"{key}[{e}]"] = round(tokens)
                        continue
                    st = list(per_task.values())
                    ws = [expert_states[t][key][e] for t in per_task]
                    fused[e], _ = _linear_update(st, ws, anchor(key)[e], lam, eps)
            continue
        st = list(stats[name].values())
        assert len(st) == len(expert_states), name
        states = list(expert_states.values())
        # Conv1D stores W transposed: work with W (d_out, d_in) and store it back transposed
        flip = (lambda t: t.T) if isinstance(module, Conv1D) else (lambda t: t)
        ws = [flip(s[f"{name}.weight"]) for s in states]
        if _is_linear(module):
            W_new, norms = _linear_update(st, ws, flip(anchor(f"{name}.weight")), lam, eps)
            new[f"{name}.weight"] = flip(W_new)
            if getattr(module, "bias", None) is not None and cfg.calibrate_bias:
                bs = [s[f"{name}.bias"] for s in states]
                num = sum(
                    (b + W @ s["mu_t"] - W_new @ s["mu_s"]) / n for b, W, s, n in zip(bs, ws, st, norms)
                )
                den = sum(1 / n for n in norms)
                new[f"{name}.bias"] = (num + lam * anchor(f"{name}.bias")) / (den + lam)
        elif cfg.calibrate_layernorm and getattr(module, "bias", None) is None:
            shift = 1.0 if _is_offset(module) else 0.0  # solved in the effective scale 1 + w
            gs = [w + shift for w in ws]
            num = sum(s["e"] * g for s, g in zip(st, gs)) + lam * (anchor(f"{name}.weight") + shift)
            new[f"{name}.weight"] = num / (sum(s["e"] for s in st) + lam) - shift
        elif cfg.calibrate_layernorm:
            cs = [s[f"{name}.bias"] for s in states]
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
    return new, low
