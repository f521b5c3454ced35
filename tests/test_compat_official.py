"""featcal.compat.official: the reference's two calibration functions, served by featcal.

A front end written like the reference's calibrate loop (first-layer inputs as lists of
per-batch CPU tensors, layer parameters as state-dict lists per task) must give, with these two
functions, the model featcal.calibrate gives; the statistics and the merge are also checked on
their own against float64 definitions written here from docs/algorithm.md.
"""

import copy
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CLIP_VISION, features, make_data, setup
from torch import nn

from featcal import FeatCalConfig, calibrate, ops
from featcal.compat.official import collect_layer_statistics, merge_layer_parameters_with_featcal_stats
from featcal.errors import FeatCalError

FLAGS = {
    "defaults": dict(),
    "no-bias": dict(calibrate_bias=False),
    "no-layernorm": dict(calibrate_layernorm=False),
    "neither": dict(calibrate_bias=False, calibrate_layernorm=False),
}
# Without a ridge the last layer's systems are too ill-conditioned for two float32 solves to agree.
CASES = (
    [(f, torch.float64) for f in FLAGS] + [(f, torch.float32) for f in FLAGS] + [("no-ridge", torch.float64)]
)
FLAGS["no-ridge"] = dict(lambda_ratio=0.0)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _first_layer_inputs(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model.pre_layrnorm(model.embeddings(b["pixel_values"].to(model.dtype))).cpu() for b in batches
        ]


def _run_layer(layer, hidden):
    return layer(hidden, attention_mask=None)


@torch.no_grad()
def reference_style_calibrate(merged, base, experts, data, cfg: FeatCalConfig, weight_transpose=True):
    """The reference's calibrate loop, calling the two compat functions.

    With weight_transpose=False the state dicts it hands to the merge hold every 2-D weight
    transposed, (d_in, d_out), and it transposes the returned ones back before loading them.
    """
    flip = (lambda t: t) if weight_transpose else (lambda t: t.mT if t.dim() == 2 else t)
    tasks = list(experts)
    student = {t: _first_layer_inputs(merged, data[t]) for t in tasks}
    expert = {t: _first_layer_inputs(experts[t], data[t]) for t in tasks}
    layers, device = merged.encoder.layers, next(merged.parameters()).device
    for index, layer in enumerate(layers):
        merged_state = {k: flip(v.clone()) for k, v in layer.state_dict().items()}
        base_state = {k: flip(v.clone()) for k, v in base.encoder.layers[index].state_dict().items()}
        params, task_stats, next_expert = defaultdict(list), [], {}
        for t in tasks:
            expert_layer = experts[t].encoder.layers[index]
            for k, v in expert_layer.state_dict().items():
                params[k].append(flip(v.clone()))
            stats, next_expert[t] = collect_layer_statistics(
                student_layer=layer,
                expert_layer=expert_layer,
                student_inputs=student[t],
                expert_inputs=expert[t],
                layer_idx=index,
                num_layers=len(layers),
                teacher_interp_alpha=cfg.teacher_interp_alpha,
            )
            task_stats.append(stats)
        new = merge_layer_parameters_with_featcal_stats(
            expert_param_dict=params,
            expert_featcal_stats=task_stats,
            weight_transpose=weight_transpose,
            ridge_lambda=cfg.lambda_ratio,
            merged_params=merged_state,
            base_params=base_state,
            calibrate_bias=cfg.calibrate_bias,
            calibrate_layernorm=cfg.calibrate_layernorm,
            anchor_blend_rho=cfg.anchor_blend_rho,
            covariance_eps=cfg.covariance_eps,
        )
        assert list(new) == list(params)
        layer.load_state_dict({k: flip(v) for k, v in new.items()}, strict=False)
        expert = next_expert
        student = {t: [_run_layer(layer, h.to(device)).cpu() for h in hs] for t, hs in student.items()}


@pytest.mark.parametrize("case, dtype", CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in CASES])
def test_reference_style_front_end_gives_the_core_model(case, dtype):
    base, experts, merged, data = setup(CLIP_VISION, dtype=dtype)
    cfg = FeatCalConfig(progress=False, **FLAGS[case])
    core, front = copy.deepcopy(merged), copy.deepcopy(merged)
    calibrate(core, base=base, experts=experts, data=data, config=cfg)
    reference_style_calibrate(front, base, experts, data, cfg)

    weight_tol = 1e-10 if dtype == torch.float64 else 1e-4
    for index, (cb, fb, mb) in enumerate(
        zip(core.encoder.layers, front.encoder.layers, merged.encoder.layers)
    ):
        for (name, want), got, before in zip(
            cb.state_dict().items(), fb.state_dict().values(), mb.state_dict().values()
        ):
            assert got.dtype == want.dtype
            assert _rel(got, want) < weight_tol, f"layer {index} {name}"
            kept = (name.endswith("bias") and "layer_norm" not in name and not cfg.calibrate_bias) or (
                "layer_norm" in name and not cfg.calibrate_layernorm
            )
            if kept:
                assert torch.equal(got, before), f"layer {index} {name} should keep its merged value"
            elif name.endswith("weight") and got.dim() == 2:
                assert _rel(got, before) > 1e-4, f"layer {index} {name} was not calibrated"
    gen = torch.Generator().manual_seed(7)
    held_out = [CLIP_VISION.make_batch(gen, 4) for _ in range(2)]
    for b in held_out:
        b["pixel_values"] = b["pixel_values"].to(dtype)
    got, want = features(CLIP_VISION, front, held_out), features(CLIP_VISION, core, held_out)
    assert _rel(got, want) < (1e-10 if dtype == torch.float64 else 1e-4)


def test_weight_transpose_false_on_transposed_weights_gives_the_same_model():
    base, experts, merged, data = setup(CLIP_VISION)
    cfg = FeatCalConfig(progress=False)
    straight, transposed = copy.deepcopy(merged), copy.deepcopy(merged)
    reference_style_calibrate(straight, base, experts, data, cfg)
    reference_style_calibrate(transposed, base, experts, data, cfg, weight_transpose=False)
    for name, want in straight.state_dict().items():
        assert _rel(transposed.state_dict()[name], want) < 1e-12, name


def _layer_case(index: int, dtype=torch.float64):
    base, experts, merged, data = setup(CLIP_VISION, dtype=dtype)
    expert = next(iter(experts.values()))
    task_data = next(iter(data.values()))
    student = _first_layer_inputs(merged, task_data)
    teacher = _first_layer_inputs(expert, task_data)
    with torch.no_grad():
        for i in range(index):
            student = [_run_layer(merged.encoder.layers[i], h) for h in student]
            teacher = [_run_layer(expert.encoder.layers[i], h) for h in teacher]
    return merged.encoder.layers[index], expert.encoder.layers[index], student, teacher


def _collect_arguments(index: int, alpha: float = 0.25) -> dict:
    """Keyword arguments of collect_layer_statistics for layer `index` of a 3-layer tiny CLIP."""
    student_layer, expert_layer, student, teacher = _layer_case(index)
    return dict(
        student_layer=student_layer,
        expert_layer=expert_layer,
        student_inputs=student,
        expert_inputs=teacher,
        layer_idx=index,
        num_layers=3,
        teacher_interp_alpha=alpha,
    )


def _merge_arguments(params, stats, merged, base, **overrides) -> dict:
    """Keyword arguments of merge_layer_parameters_with_featcal_stats, the reference run's defaults."""
    defaults = dict(
        weight_transpose=True,
        ridge_lambda=0.05,
        calibrate_bias=True,
        calibrate_layernorm=True,
        anchor_blend_rho=2.2,
        covariance_eps=1e-8,
    )
    given = dict(expert_param_dict=params, expert_featcal_stats=stats, merged_params=merged, base_params=base)
    return {**defaults, **given, **overrides}


def _module_inputs(layer, inputs) -> dict[str, torch.Tensor]:
    """Every Linear's and LayerNorm's input over all batches, (tokens, d) per module."""
    seen = defaultdict(list)
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0]))
        for name, m in layer.named_modules()
        if isinstance(m, (nn.Linear, nn.LayerNorm))
    ]
    with torch.no_grad():
        outputs = [_run_layer(layer, h) for h in inputs]
    for h in handles:
        h.remove()
    return {name: torch.cat(xs).double().reshape(-1, xs[0].shape[-1]) for name, xs in seen.items()}, outputs


@pytest.mark.parametrize("index", [1, 2], ids=["middle-layer", "last-layer"])
def test_statistics_follow_the_definition(index):
    """Each module's dict against docs/algorithm.md s.4 in float64; the last layer focuses on the class
    token except in k_proj and v_proj."""
    alpha, layers = 0.3, 3
    args = _collect_arguments(index, alpha)
    student_layer, student = args["student_layer"], args["student_inputs"]
    stats, next_inputs = collect_layer_statistics(**args)
    xs_all, _ = _module_inputs(student_layer, student)
    xe_all, expert_out = _module_inputs(args["expert_layer"], args["expert_inputs"])
    defined = [n for n, m in student_layer.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
    assert list(stats) == defined and set(xs_all) == set(defined)
    for got, want in zip(next_inputs, expert_out):
        assert got.device.type == "cpu" and torch.equal(got, want)
    for name, xs in xs_all.items():
        w = torch.ones(xs.shape[0], dtype=torch.float64)
        if index == layers - 1 and not name.endswith(("k_proj", "v_proj")):
            w = torch.ones(student[0].shape[:2], dtype=torch.float64)
            w[:, 1:] = 0.01
            w = w.repeat(len(student), 1).reshape(-1)
        s = stats[name]
        if isinstance(student_layer.get_submodule(name), nn.Linear):
            xt = alpha * xe_all[name] + (1 - alpha) * xs
            want = {
                "kind": "linear",
                "mean_student": w @ xs / w.sum(),
                "mean_teacher": w @ xt / w.sum(),
                "cov_ss": xs.T @ (w[:, None] * xs) / w.sum(),
                "cross_st": xs.T @ (w[:, None] * xt) / w.sum(),
            }
        else:
            z = F.layer_norm(xs, xs.shape[-1:], eps=student_layer.get_submodule(name).eps)
            want = {
                "kind": "layernorm",
                "mean_student": w @ z / w.sum(),
                "energy_student": w @ z.square() / w.sum(),
            }
        assert list(s) == list(want), name
        assert s["kind"] == want.pop("kind")
        for key, value in want.items():
            assert s[key].device.type == "cpu" and s[key].dtype == torch.float64
            assert _rel(s[key], value) < 1e-12, f"{name} {key}"
    shared = stats["self_attn.k_proj"]["cov_ss"] is stats["self_attn.v_proj"]["cov_ss"]
    assert shared
    assert (stats["self_attn.q_proj"]["cov_ss"] is stats["self_attn.k_proj"]["cov_ss"]) == (
        index != layers - 1
    )


def _closed_form(params, stats, merged, base, lam, eps, rho, calibrate_bias, calibrate_norm):
    """docs/algorithm.md s.6 for a layer of Linear 'proj' and LayerNorm 'norm', float64, tasks as lists."""
    lam = max(lam, 0.0)
    out = {}

    def anchor(name):
        if name in merged and name in base:
            return rho * merged[name] + (1 - rho) * base[name]
        return None

    st = [s["proj"] for s in stats]
    Ws, bs = params["proj.weight"], params["proj.bias"]
    n = [max(s["cov_ss"].norm().item(), eps) for s in st]
    d = Ws[0].shape[1]
    A = sum(s["cov_ss"] / k for s, k in zip(st, n)) + (lam + (eps if eps > 0 else 0)) * torch.eye(d).double()
    B = sum((s["cross_st"] / k) @ W.T for s, k, W in zip(st, n, Ws))
    if anchor("proj.weight") is not None:
        B = B + lam * anchor("proj.weight").T
    W_new = torch.linalg.solve(A, B).T
    out["proj.weight"] = W_new
    if calibrate_bias:
        num = sum(
            (b + W @ s["mean_teacher"] - W_new @ s["mean_student"]) / k for b, W, s, k in zip(bs, Ws, st, n)
        )
        den = sum(1 / k for k in n)
        a = anchor("proj.bias")
        out["proj.bias"] = num / den if a is None else (num + lam * a) / (den + lam)
    if calibrate_norm:
        sn = [s["norm"] for s in stats]
        gs, cs = params["norm.weight"], params["norm.bias"]
        ga, ca = anchor("norm.weight"), anchor("norm.bias")
        a11 = sum(s["energy_student"] for s in sn) + (lam if ga is not None else 0)
        a12 = sum(s["mean_student"] for s in sn)
        a22 = len(sn) + (lam if ca is not None else 0)
        r1 = sum(s["energy_student"] * g + s["mean_student"] * c for s, g, c in zip(sn, gs, cs))
        r2 = sum(s["mean_student"] * g + c for s, g, c in zip(sn, gs, cs))
        r1 = r1 if ga is None else r1 + lam * ga
        r2 = r2 if ca is None else r2 + lam * ca
        det = (a11 * a22 - a12**2).clamp_min(eps)
        out["norm.weight"], out["norm.bias"] = (a22 * r1 - a12 * r2) / det, (a11 * r2 - a12 * r1) / det
    return out


def _random_layer(tasks=3, d_in=7, d_out=5, seed=0):
    """Reference-format inputs of the merge for a layer with Linear 'proj' and LayerNorm 'norm'."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    params = {
        "proj.weight": [rand(d_out, d_in) for _ in range(tasks)],
        "proj.bias": [rand(d_out) for _ in range(tasks)],
        "norm.weight": [1 + 0.1 * rand(d_in) for _ in range(tasks)],
        "norm.bias": [rand(d_in) for _ in range(tasks)],
        "scale": [rand(3) for _ in range(tasks)],  # neither weight nor bias: kept as merged
    }
    stats = []
    for _ in range(tasks):
        x = rand(40, d_in)
        xt = x + 0.3 * rand(40, d_in)
        z = F.layer_norm(x, (d_in,))
        stats.append(
            {
                "proj": {
                    "kind": "linear",
                    "mean_student": x.mean(0),
                    "mean_teacher": xt.mean(0),
                    "cov_ss": x.T @ x / 40,
                    "cross_st": x.T @ xt / 40,
                },
                "norm": {
                    "kind": "layernorm",
                    "mean_student": z.mean(0),
                    "energy_student": z.square().mean(0),
                },
            }
        )
    merged = {k: sum(v) / tasks + 0.05 * rand(*v[0].shape) for k, v in params.items()}
    base = {k: sum(v) / tasks - 0.05 * rand(*v[0].shape) for k, v in params.items()}
    return params, stats, merged, base


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(drop=("proj.weight",)),
        dict(drop=("proj.bias", "norm.weight")),
        dict(drop=("scale",)),
        dict(lam=0.0),
        dict(lam=-1.0, eps=0.0),
        dict(lam=0.7, rho=1.0, eps=1e-3),
        dict(calibrate_bias=False),
        dict(calibrate_norm=False),
    ],
    ids=["defaults", "no-weight-anchor", "no-bias-and-gamma-anchor", "scale-not-merged", "no-ridge",
         "negative-ridge-no-eps", "other-hyperparameters", "no-bias", "no-norm"],
)  # fmt: skip
def test_merge_follows_the_closed_forms(case):
    """Anchors exist only where both the merged and the base parameter are given."""
    lam, eps, rho = case.get("lam", 0.05), case.get("eps", 1e-8), case.get("rho", 2.2)
    calibrate_bias, calibrate_norm = case.get("calibrate_bias", True), case.get("calibrate_norm", True)
    params, stats, merged, base = _random_layer()
    for name in case.get("drop", ()):
        del merged[name]
    hyper = dict(ridge_lambda=lam, covariance_eps=eps, anchor_blend_rho=rho)
    flags = dict(calibrate_bias=calibrate_bias, calibrate_layernorm=calibrate_norm)
    got = merge_layer_parameters_with_featcal_stats(
        **_merge_arguments(params, stats, merged, base, **hyper, **flags)
    )
    want = _closed_form(params, stats, merged, base, lam, eps, rho, calibrate_bias, calibrate_norm)
    assert list(got) == list(params)
    for name, value in got.items():
        if name in want:
            assert _rel(value, want[name]) < 1e-10, name
        elif name in merged:
            assert torch.equal(value, merged[name]), f"{name} should keep its merged value"
        else:
            assert torch.allclose(value, torch.stack(params[name]).mean(0)), f"{name}: the experts' mean"


def test_merge_shares_one_system_among_modules_with_equal_statistics(monkeypatch):
    """q/k/v of a middle layer share their input statistics: one system, whether the tensors are
    shared (featcal's statistics) or equal copies (the reference's); perturbing one splits it."""
    monkeypatch.setenv("FEATCAL_BACKEND", "torch")
    args = _collect_arguments(1)
    stats, _ = collect_layer_statistics(**args)
    params = {k: [v.clone()] for k, v in args["expert_layer"].state_dict().items()}
    merged = {k: v.clone() for k, v in args["student_layer"].state_dict().items()}

    def merge(task_stats):
        before = ops.served[("ridge_solve", "torch")]
        out = merge_layer_parameters_with_featcal_stats(
            **_merge_arguments(params, [task_stats], merged, merged)
        )
        return out, ops.served[("ridge_solve", "torch")] - before

    shared, solves = merge(stats)
    assert solves == 4  # q/k/v, out_proj, fc1, fc2
    copies = {
        m: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for m, s in stats.items()
    }
    from_copies, solves = merge(copies)
    assert solves == 4
    for name, value in shared.items():
        assert torch.equal(value, from_copies[name]), name
    copies["self_attn.k_proj"]["cov_ss"] = copies["self_attn.k_proj"]["cov_ss"] * (1 + 1e-9)
    _, solves = merge(copies)
    assert solves == 5


def test_collect_rejects_mismatched_inputs():
    args = _collect_arguments(1)
    with pytest.raises(FeatCalError, match="student_inputs has 2 batches but expert_inputs has 1"):
        collect_layer_statistics(**{**args, "expert_inputs": args["expert_inputs"][:1]})
    shorter = [h[:, :-1] for h in args["expert_inputs"]]
    with pytest.raises(
        FeatCalError, match=r"reads an input of shape \(4, 17, 32\) in the merged model but \(4, 16, 32\)"
    ):
        collect_layer_statistics(**{**args, "expert_inputs": shorter})
    other = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(FeatCalError, match="different modules"):
        collect_layer_statistics(**{**args, "expert_layer": other})
    assert collect_layer_statistics(**{**args, "student_inputs": [], "expert_inputs": []}) == ({}, [])


def test_merge_errors_name_the_task_module_and_shape():
    args = _merge_arguments(*_random_layer())
    with pytest.raises(FeatCalError, match="expert_featcal_stats is empty"):
        merge_layer_parameters_with_featcal_stats(**{**args, "expert_featcal_stats": []})
    params = dict(args["expert_param_dict"], **{"proj.bias": args["expert_param_dict"]["proj.bias"][:2]})
    with pytest.raises(FeatCalError, match=r"expert_param_dict\['proj.bias'\] has 2 tensors but .* 3 tasks"):
        merge_layer_parameters_with_featcal_stats(**{**args, "expert_param_dict": params})
    stats = [dict(s) for s in args["expert_featcal_stats"]]
    del stats[1]["norm"]
    with pytest.raises(FeatCalError, match=r"expert_featcal_stats\[1\] has no statistics for module 'norm'"):
        merge_layer_parameters_with_featcal_stats(**{**args, "expert_featcal_stats": stats})
    stats = [{m: dict(v) for m, v in s.items()} for s in args["expert_featcal_stats"]]
    stats[2]["proj"]["cross_st"] = stats[2]["proj"]["cross_st"][:, :-1]
    with pytest.raises(
        FeatCalError,
        match=r"expert_featcal_stats\[2\]\['proj'\]\['cross_st'\] is \(7, 6\); expected .* \(7, 7\)",
    ):
        merge_layer_parameters_with_featcal_stats(**{**args, "expert_featcal_stats": stats})
    stats = [{m: dict(v) for m, v in s.items()} for s in args["expert_featcal_stats"]]
    stats[0]["proj"]["kind"] = "conv"
    with pytest.raises(FeatCalError, match="module 'proj': statistics kind"):
        merge_layer_parameters_with_featcal_stats(**{**args, "expert_featcal_stats": stats})
    with pytest.raises(FeatCalError, match="covariance_eps must be >= 0"):
        merge_layer_parameters_with_featcal_stats(**{**args, "covariance_eps": -1.0})


def test_merge_rejects_all_zero_inputs_without_eps():
    args = _merge_arguments(*_random_layer(), covariance_eps=0.0)
    for s in args["expert_featcal_stats"]:
        s["proj"]["cov_ss"] = torch.zeros_like(s["proj"]["cov_ss"])
    with pytest.raises(FeatCalError, match=r"inputs of module\(s\) \['proj'\] are all zero"):
        merge_layer_parameters_with_featcal_stats(**args)


def test_float32_layer_gives_float32_statistics_and_parameters():
    args = _collect_arguments(1)
    layer32, expert32 = (
        copy.deepcopy(args["student_layer"]).float(),
        copy.deepcopy(args["expert_layer"]).float(),
    )
    stats, outputs = collect_layer_statistics(
        **{
            **args,
            "student_layer": layer32,
            "expert_layer": expert32,
            "student_inputs": [h.float() for h in args["student_inputs"]],
            "expert_inputs": [h.float() for h in args["expert_inputs"]],
        }
    )
    wide, _ = collect_layer_statistics(**args)
    assert all(o.dtype == torch.float32 for o in outputs)
    for name, s in stats.items():
        for key, value in s.items():
            if key != "kind":
                assert value.dtype == torch.float32
                assert _rel(value, wide[name][key]) < 1e-5, f"{name} {key}"
    state = expert32.state_dict()
    merged = layer32.state_dict()
    new = merge_layer_parameters_with_featcal_stats(
        **_merge_arguments({k: [v] for k, v in state.items()}, [stats], merged, merged)
    )
    assert all(new[k].dtype == torch.float32 and new[k].shape == v.shape for k, v in state.items())


@pytest.mark.interpreter
def test_statistics_through_the_triton_kernels(monkeypatch):
    kernels = pytest.importorskip("featcal.kernels")
    if not kernels.INTERPRETED:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    args = _collect_arguments(2)
    args = {
        **args,
        "student_layer": copy.deepcopy(args["student_layer"]).float(),
        "expert_layer": copy.deepcopy(args["expert_layer"]).float(),
        "student_inputs": [h.float() for h in args["student_inputs"]],
        "expert_inputs": [h.float() for h in args["expert_inputs"]],
    }
    monkeypatch.setenv("FEATCAL_BACKEND", "torch")
    want, _ = collect_layer_statistics(**args)
    monkeypatch.setenv("FEATCAL_BACKEND", "triton")
    before = {
        op: ops.served[(op, "triton-interpreter")]
        for op in ("weighted_gram", "weighted_cross", "norm_moments")
    }
    got, _ = collect_layer_statistics(**args)
    for op, count in before.items():
        assert ops.served[(op, "triton-interpreter")] > count, op
    for name, s in got.items():
        for key, value in s.items():
            if key != "kind":
                assert _rel(value, want[name][key]) < 1e-5, f"{name} {key}"


def test_merge_solves_in_the_extension(cpp):
    before = ops.served[("ridge_solve", "cpp")]
    merge_layer_parameters_with_featcal_stats(**_merge_arguments(*_random_layer()))
    assert ops.served[("ridge_solve", "cpp")] == before + 1


@pytest.mark.cuda
def test_cuda_layers_match_cpu(monkeypatch):
    """float32 throughout: cuDNN's convolutions (CLIP's patch embedding) would run in TF32 by
    default, about 1e-3 off the CPU (see the README's GPU notes)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    base, experts, merged, _ = setup(CLIP_VISION, dtype=torch.float32)
    data = make_data(CLIP_VISION, list(experts))
    cfg = FeatCalConfig(progress=False)
    on_cpu = copy.deepcopy(merged)
    reference_style_calibrate(on_cpu, base, experts, data, cfg)
    models = [copy.deepcopy(m).cuda() for m in (merged, base)]
    gpu_experts = {t: copy.deepcopy(e).cuda() for t, e in experts.items()}
    gpu_data = {t: [{"pixel_values": b["pixel_values"].cuda()} for b in bs] for t, bs in data.items()}
    reference_style_calibrate(models[0], models[1], gpu_experts, gpu_data, cfg)
    for name, want in on_cpu.state_dict().items():
        assert _rel(models[0].state_dict()[name].cpu(), want) < 1e-4, name
