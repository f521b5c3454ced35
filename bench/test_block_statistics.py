"""One task's statistics pass over one CLIP ViT-B/32 block: the reference's formulation against
featcal's, on the same inputs (1,600 tokens: 32 images of 50 tokens, two batches of 16).

Both run the expert block and the merged block on the task's two batches and produce, per
calibrated Linear, the Gram G_t and the right-hand side C_t W_t^T, and per LayerNorm the
moments of z. The reference formulation keeps every module input of a batch, makes a weighted
copy of x_s and of the teacher input x_t, and takes a full Gram and a full d_in x d_in cross
product per module (q, k and v included) before multiplying by W_t^T; featcal shares one
lower-triangle Gram per input, projects fc2's teacher input through W_t^T, and stops the merged
forward after fc2's input. Each test checks the results agree before timing.

A third row times `featcal.compat.official.collect_layer_statistics` on the same inputs, passed
as the reference's front end passes them (lists of per-batch tensors): it must return the
d_in x d_in cross moment C_t itself, so fc2 cannot be projected; its right-hand side here is
that C_t times W_t^T, as the reference's merge computes it.

    pytest bench/ --benchmark-only
"""

import copy

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from featcal.compat.official import collect_layer_statistics
from featcal.config import FeatCalConfig
from featcal.errors import Location
from featcal.models.adapters import CLIP_VISION
from featcal.models.capture import BlockContext
from featcal.models.modules import calibrated_modules
from featcal.pipeline.phases import BlockRun, accumulate, discover, new_sums, reduce
from featcal.pipeline.state import BlockInputs
from featcal.pipeline.statistics import LinearMoments, normalise, project

ALPHA = 0.25


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12
    )
    merged = CLIPVisionModel(config).eval().encoder.layers[0]
    expert = copy.deepcopy(merged)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    student = [torch.randn(16, 50, 768) for _ in range(2)]
    expert_inputs = [h + 0.1 * torch.randn_like(h) for h in student]
    contexts = [BlockContext(args=(None,), kwargs={})] * 2
    return merged, expert, BlockInputs(student, expert_inputs, contexts, contexts, [None] * 2, [None] * 2)


@torch.no_grad()
def reference_formulation(merged, expert, inputs):
    """Per module: weighted copies, full Gram and cross of the cached inputs, then C W^T."""
    targets_s, targets_e = calibrated_modules(merged), calibrated_modules(expert)
    acc = {}
    for i, hidden in enumerate(inputs.student):
        cache_s, cache_e, handles = {}, {}, []
        for name in targets_s:
            handles.append(targets_s[name].module.register_forward_pre_hook(_keep(cache_s, name)))
            handles.append(targets_e[name].module.register_forward_pre_hook(_keep(cache_e, name)))
        merged(hidden, None)
        expert(inputs.expert[i], None)
        for h in handles:
            h.remove()
        for name, ref in targets_s.items():
            xs = cache_s[name].reshape(-1, cache_s[name].shape[-1])
            w = torch.ones(xs.shape[0], 1)
            a = acc.setdefault(name, {})
            if isinstance(ref.module, nn.Linear):
                xe = cache_e[name].reshape(-1, xs.shape[-1])
                xt = ALPHA * xe + (1 - ALPHA) * xs
                for key, value in (("G", xs.T @ (xs * w)), ("C", xs.T @ (xt * w)), ("n", w.sum())):
                    a[key] = a.get(key, 0) + value
            else:
                z = torch.nn.functional.layer_norm(xs, ref.module.normalized_shape, eps=ref.module.eps)
                for key, value in (("m", (z * w).sum(0)), ("e", (z.square() * w).sum(0)), ("n", w.sum())):
                    a[key] = a.get(key, 0) + value
    out = {}
    for name, a in acc.items():
        if "G" in a:
            out[name] = (a["G"] / a["n"], (a["C"] / a["n"]) @ targets_e[name].weight().T)
    return out


def _keep(cache, name):
    return lambda module, args: cache.__setitem__(name, args[0])


@torch.no_grad()
def featcal_formulation(merged, expert, inputs):
    cpu = torch.device("cpu")
    run = BlockRun(CLIP_VISION, 0, 2, Location(block=0), FeatCalConfig(), torch.float32, cpu)
    plan, first = discover(run, merged, expert, inputs)
    sums = new_sums(run, plan, tokens=sum(h.shape[0] * h.shape[1] for h in inputs.student))
    accumulate(run, plan, merged, expert, inputs, sums, [], task="t", first=first)
    experts = calibrated_modules(expert)
    moments = normalise(reduce(sums), experts, alpha=ALPHA, where=run.where)
    out = {}
    for mom in (project(m, experts) for m in moments):
        if isinstance(mom, LinearMoments):
            for k, member in enumerate(mom.group.members):
                out[member.name] = (mom.gram, mom.rhs[k])
    return out


def _check_agree(case):
    want, got = reference_formulation(*case), featcal_formulation(*case)
    assert want.keys() == got.keys()
    for name in want:
        for a, b in zip(got[name], want[name]):
            assert ((a - b).norm() / b.norm()).item() < 1e-5, name


def test_reference_formulation(benchmark, case):
    _check_agree(case)
    benchmark.pedantic(reference_formulation, args=case, rounds=3, iterations=1)


def test_featcal_formulation(benchmark, case):
    _check_agree(case)
    benchmark.pedantic(featcal_formulation, args=case, rounds=3, iterations=1)


@torch.no_grad()
def compat_formulation(merged, expert, inputs):
    stats, _ = collect_layer_statistics(
        student_layer=merged, expert_layer=expert, student_inputs=list(inputs.student),
        expert_inputs=list(inputs.expert), layer_idx=0, num_layers=2, teacher_interp_alpha=ALPHA,
    )  # fmt: skip
    weights = calibrated_modules(expert)
    return {
        name: (s["cov_ss"], s["cross_st"] @ weights[name].weight().T)
        for name, s in stats.items()
        if s["kind"] == "linear"
    }


def test_compat_collect_layer_statistics(benchmark, case):
    want, got = reference_formulation(*case), compat_formulation(*case)
    assert want.keys() == got.keys()
    for name in want:
        for a, b in zip(got[name], want[name]):
            assert ((a - b).norm() / b.norm()).item() < 1e-5, name
    benchmark.pedantic(compat_formulation, args=case, rounds=3, iterations=1)
