"""Each phase of a block on a tiny block, against float64 definitions written here, and the
properties the distributed and resume work rely on: raw sums of disjoint work items add up to
one pass over all of them, typed state round-trips bit-exactly through a file, a forward-only
replay gives the streams accumulate gave, and solving groups one at a time equals
solving them together."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import STACK_ADAPTER
from torch import nn

from featcal import FeatCalConfig
from featcal.errors import FeatCalError, Location
from featcal.models.capture import BlockContext
from featcal.models.modules import LINEAR, RMSNORM
from featcal.pipeline import phases
from featcal.pipeline.phases import BlockRun
from featcal.pipeline.solver import BlockSystem
from featcal.pipeline.state import BlockInputs, RunState
from featcal.pipeline.statistics import CrossMoments, CrossSums, NormSums, ProjectSums, normalise

D, H, TOKENS = 8, 12, 5


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # as inside calibrate
        yield


class TinyBlock(nn.Module):
    """A norm on the block input, two Linears sharing the raw input, one after a ReLU."""

    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm or nn.RMSNorm(D, eps=1e-6)
        self.q, self.k = nn.Linear(D, H), nn.Linear(D, H)
        self.out = nn.Linear(H, D)

    def forward(self, x):
        return self.norm(x) + self.out(torch.relu(self.q(x) * self.k(x)))


def _run(method="cross", alpha=0.25, dtype=torch.float64) -> BlockRun:
    cfg = FeatCalConfig(progress=False, cross_method=method, teacher_interp_alpha=alpha)
    return BlockRun(STACK_ADAPTER, 0, 2, Location(block=0), cfg, dtype, torch.device("cpu"))


def _blocks(seed=0, integer=False):
    torch.manual_seed(seed)
    merged = TinyBlock(nn.RMSNorm(D, eps=0.0) if integer else None).double()
    expert = copy.deepcopy(merged)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if integer:  # small integers everywhere, so every linear input and output is exact
            for block in (merged, expert):
                for p in block.parameters():
                    p.copy_(torch.randint(-2, 3, p.shape))
    return merged, expert


def _inputs(batches=4, seed=1, integer=False) -> BlockInputs:
    gen = torch.Generator().manual_seed(seed)
    if integer:
        # entries +-2^k (one k per token): rms = 2^k exactly, so the norm's z is +-1 exactly
        def draw():
            signs = torch.randint(0, 2, (3, TOKENS, D), generator=gen) * 2 - 1
            return signs * 2.0 ** torch.randint(0, 3, (3, TOKENS, 1), generator=gen)
    else:

        def draw():
            return torch.randn(3, TOKENS, D, generator=gen, dtype=torch.float64)

    student = [draw().double() for _ in range(batches)]
    expert = [draw().double() for _ in range(batches)]
    ctx = [BlockContext((), {})] * batches
    return BlockInputs(student, expert, ctx, ctx, [None] * batches, [None] * batches)


def _part(inputs: BlockInputs, batches: slice) -> BlockInputs:
    return BlockInputs(*(list(field)[batches] for field in (
        inputs.student, inputs.expert, inputs.student_ctx, inputs.expert_ctx, inputs.weights,
        inputs.memory_weights,
    )))  # fmt: skip


def _accumulate(run, merged, expert, inputs, tokens):
    plan, first = phases.discover(run, merged, expert, inputs)
    sums = phases.new_sums(run, plan, tokens)
    outputs = []
    phases.accumulate(run, plan, merged, expert, inputs, sums, outputs, task="t", first=first)
    return plan, sums, outputs


def _inputs_of(block, hidden, names):
    seen = {}
    handles = [
        getattr(block, n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
        for n in names
    ]
    block(hidden)
    for h in handles:
        h.remove()
    return seen


def test_discover_groups_modules_that_share_an_input():
    merged, expert = _blocks()
    plan, first = phases.discover(_run(), merged, expert, _inputs())
    assert [g.names for g in plan.groups] == [["norm"], ["q", "k"], ["out"]]
    assert [g.kind for g in plan.groups] == [RMSNORM, LINEAR, LINEAR] and plan.last == "out"
    assert torch.equal(first.output, expert(_inputs().expert[0]))
    assert plan.only([1]).groups == [plan.groups[1]] and plan.only([0, 1]).last == "k"


@pytest.mark.parametrize("method", ["cross", "project"])
def test_accumulate_gives_raw_sums_of_their_definition(method):
    merged, expert = _blocks()
    inputs = _inputs()
    plan, sums, outputs = _accumulate(_run(method), merged, expert, inputs, tokens=10_000)
    want = {"x": 0, "xe": 0, "n": 0, "z": 0, "z2": 0, "h": 0, "ye": {"q": 0, "k": 0}}
    for xs, xe in zip(inputs.student, inputs.expert):
        s_in = _inputs_of(merged, xs, ["out"])
        x, e = xs.reshape(-1, D), xe.reshape(-1, D)
        z = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
        want["n"] += x.shape[0]
        want["x"] += x.T @ x if method == "cross" else 0
        want["xe"] += x.T @ e
        want["z"] += z.sum(0)
        want["z2"] += z.square().sum(0)
        want["h"] += s_in["out"].reshape(-1, H).T @ s_in["out"].reshape(-1, H)
        for name in ("q", "k"):
            want["ye"][name] += x.T @ getattr(expert, name)(e)
    norm, qk, out = sums.groups
    assert isinstance(norm, NormSums) and float(norm.weight) == want["n"]
    torch.testing.assert_close(norm.z, want["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.z_square, want["z2"], rtol=1e-12, atol=1e-12)
    # only the lower triangle of a Gram is accumulated
    torch.testing.assert_close(out.gram.tril(), want["h"].tril(), rtol=1e-12, atol=1e-12)
    if method == "cross":
        assert isinstance(qk, CrossSums)
        torch.testing.assert_close(qk.cross, want["xe"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(qk.gram.tril(), want["x"].tril(), rtol=1e-12, atol=1e-12)
    else:
        assert isinstance(qk, ProjectSums) and not qk.per_token
        for k, name in enumerate(("q", "k")):
            torch.testing.assert_close(qk.rhs[k], want["ye"][name], rtol=1e-12, atol=1e-12)
    for got, xe in zip(outputs, inputs.expert):
        assert torch.equal(got, expert(xe))


@pytest.mark.parametrize(
    ("method", "alpha", "tokens"),
    [("cross", 0.25, 10_000), ("project", 0.25, 10_000), ("project", 0.75, 3), ("auto", 0.25, 10_000)],
    ids=["cross", "project", "project-per-token", "auto"],
)
def test_reduce_of_two_halves_equals_one_pass_bit_exact(method, alpha, tokens):
    """Exactly representable float64 data: any difference would be a nonlinearity, not rounding."""
    merged, expert = _blocks(integer=True)
    inputs = _inputs(integer=True)
    run = _run(method, alpha)
    _, whole, whole_out = _accumulate(run, merged, expert, inputs, tokens)
    _, first, first_out = _accumulate(run, merged, expert, _part(inputs, slice(0, 2)), tokens)
    _, second, second_out = _accumulate(run, merged, expert, _part(inputs, slice(2, 4)), tokens)
    # the all-reduce of two processes, each holding one half
    reduced = phases.reduce(first, lambda tensors: [t.add_(o) for t, o in zip(tensors, second.tensors())])
    assert [type(g) for g in reduced.groups] == [type(g) for g in whole.groups]
    for (name, a), (_, b) in zip(whole.named_tensors(), reduced.named_tensors()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(whole_out, first_out + second_out))
    if method == "project" and tokens == 3:
        assert reduced.groups[1].per_token


def test_reduce_of_two_halves_matches_one_pass_on_random_data():
    merged, expert = _blocks()
    inputs = _inputs()
    run = _run("auto")
    _, whole, _ = _accumulate(run, merged, expert, inputs, 60)
    _, first, _ = _accumulate(run, merged, expert, _part(inputs, slice(0, 1)), 60)
    _, second, _ = _accumulate(run, merged, expert, _part(inputs, slice(1, 4)), 60)
    first.add_(second)
    assert phases.reduce(first) is first  # one process: the identity
    for (name, a), (_, b) in zip(whole.named_tensors(), first.named_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=name)


def test_state_dicts_round_trip_bit_exact_through_a_file(tmp_path):
    merged, expert = _blocks()
    inputs = _inputs()
    for method in ("cross", "project"):
        run = _run(method)
        plan, sums, _ = _accumulate(run, merged, expert, inputs, 10_000)
        save_file(sums.state_dict(), tmp_path / "sums.safetensors")
        fresh = phases.new_sums(run, plan, 10_000)
        fresh.load_state_dict(load_file(tmp_path / "sums.safetensors"))
        assert list(fresh.state_dict()) == list(sums.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(fresh.tensors(), sums.tensors()))

        system = BlockSystem.zeros(plan, run.dtype, run.device)
        phases.fold(run, system, sums, expert, "t")
        save_file(system.state_dict(), tmp_path / "system.safetensors")
        loaded = BlockSystem.zeros(plan, run.dtype, run.device)
        loaded.load_state_dict(load_file(tmp_path / "system.safetensors"))
        assert system.state_dict().keys() == loaded.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(system.tensors(), loaded.tensors()))
    state = fresh.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(FeatCalError, match=r"TaskSums: state has tensors missing \['groups.0.weight'\]"):
        fresh.load_state_dict(state)


def test_systems_of_disjoint_tasks_add_up():
    merged, expert = _blocks()
    run = _run()
    plan, _, _ = _accumulate(run, merged, expert, _inputs(), 10_000)
    together, alone = BlockSystem.zeros(plan, run.dtype, run.device), []
    for seed in (3, 4):
        _, sums, _ = _accumulate(run, merged, expert, _inputs(seed=seed), 10_000)
        one = BlockSystem.zeros(plan, run.dtype, run.device)
        phases.fold(run, one, copy.deepcopy(sums), expert, "t")
        phases.fold(run, together, sums, expert, "t")
        alone.append(one)
    alone[0].add_(alone[1])
    assert int(alone[0].tasks) == int(together.tasks) == 2
    for a, b in zip(alone[0].tensors(), together.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_normalise_gives_the_weighted_means():
    merged, expert = _blocks()
    inputs = _inputs()
    run = _run("cross", alpha=0.25)
    _, sums, _ = _accumulate(run, merged, expert, inputs, 10_000)
    moments = normalise(sums, run.modules(expert), alpha=0.25, where=run.where)
    x = torch.cat(list(inputs.student)).reshape(-1, D)
    xe = torch.cat(list(inputs.expert)).reshape(-1, D)
    xt = 0.25 * xe + 0.75 * x
    qk = moments[1]
    assert isinstance(qk, CrossMoments)
    torch.testing.assert_close(qk.gram, x.T @ x / len(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qk.cross, x.T @ xt / len(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qk.mean_teacher, xt.mean(0), rtol=1e-12, atol=1e-12)


def test_solving_groups_one_at_a_time_equals_solving_all():
    merged, expert = _blocks()
    base, _ = _blocks(seed=7)
    run = _run()
    plan, sums, _ = _accumulate(run, merged, expert, _inputs(), 10_000)
    system = BlockSystem.zeros(plan, run.dtype, run.device)
    phases.fold(run, system, sums, expert, "t")
    together, apart = copy.deepcopy(merged), copy.deepcopy(merged)
    want = phases.solve(run, copy.deepcopy(system), plan, together, base)
    split = copy.deepcopy(system)
    got = phases.solve(run, split, plan, apart, base, groups=[2]) + phases.solve(
        run, split, plan, apart, base, [0, 1]
    )
    assert sorted((u.module, u.which) for u in got) == sorted((u.module, u.which) for u in want)
    for (name, a), b in zip(together.state_dict().items(), apart.state_dict().values()):
        assert torch.equal(a, b), name
    moved = (together.q.weight - merged.q.weight).norm() / merged.q.weight.norm()
    assert moved > 1e-3  # solve wrote the new parameters into the block


def test_replay_and_propagate_give_the_streams_of_accumulate():
    merged, expert = _blocks()
    inputs = _inputs()
    run = _run()
    _, _, outputs = _accumulate(run, merged, expert, inputs, 10_000)
    state = RunState("device", torch.device("cpu"))
    (task,) = state.begin_stage(["t"]).values()
    for xs, xe, ctx in zip(inputs.student, inputs.expert, inputs.student_ctx):
        task.add_batch(xs, ctx, None, None)
        task.add_expert_batch(xe, ctx)
    phases.replay_expert(run, expert, task)
    assert [torch.equal(a, b) for a, b in zip(task.expert, outputs)] == [True] * len(outputs)
    phases.propagate(run, merged, task)
    assert all(torch.equal(a, merged(x)) for a, x in zip(task.student, inputs.student))
    assert task.tokens == 4 * 3 * TOKENS


def test_measure_drift():
    s, e = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    keep = w.bool()
    want = ((s - e)[keep].square().sum() / e[keep].square().sum()).sqrt().item()
    assert phases.drift(s, e, w) == pytest.approx(want, rel=1e-12)
    assert phases.drift(s[:1], e, w) == pytest.approx(
        ((s[0] - e[0])[keep[0]].square().sum() / e[0][keep[0]].square().sum()).sqrt().item(), rel=1e-12
    )


def test_location_names_stage_block_module_task_batch():
    where = Location(stage="t5-decoder", block=1)
    assert str(where) == "t5-decoder block 1"
    assert str(where.at(task="a", module="q", batch=2)) == "task 'a', t5-decoder block 1, module 'q', batch 2"
    assert str(Location(block=1)) != str(where)


def test_a_reloaded_system_solves_as_the_original(tmp_path):
    """A LayerNorm with a bias: its 2x2 solve reads the number of tasks folded, which the state
    dict carries."""
    merged, expert = _blocks()
    merged.norm, expert.norm = nn.LayerNorm(D).double(), nn.LayerNorm(D).double()
    with torch.no_grad():
        expert.norm.weight.add_(0.1)
        expert.norm.bias.add_(0.2)
    run = _run()
    plan, _, _ = _accumulate(run, merged, expert, _inputs(), 10_000)
    system = BlockSystem.zeros(plan, run.dtype, run.device)
    for seed in (3, 4):
        _, sums, _ = _accumulate(run, merged, expert, _inputs(seed=seed), 10_000)
        phases.fold(run, system, sums, expert, "t")
    save_file(system.state_dict(), tmp_path / "system.safetensors")
    loaded = BlockSystem.zeros(plan, run.dtype, run.device)
    loaded.load_state_dict(load_file(tmp_path / "system.safetensors"))
    assert int(loaded.tasks) == 2
    a, b = copy.deepcopy(merged), copy.deepcopy(merged)
    phases.solve(run, system, plan, a, merged)
    phases.solve(run, loaded, plan, b, merged)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.norm.bias, merged.norm.bias)
    wrong = {k: v.float() for k, v in system.state_dict().items()}
    with pytest.raises(FeatCalError, match=r"tensor 'groups.0.energy' is torch.float32 \(8,\) in the state"):
        loaded.load_state_dict(wrong)


def test_measure_phases_follow_the_drift_examples():
    merged, expert = _blocks()
    inputs = _inputs(batches=1)
    run = _run()
    state = RunState("device", torch.device("cpu"))
    (task,) = state.begin_stage(["t"]).values()
    task.add_batch(inputs.student[0], inputs.student_ctx[0], None, None)
    task.add_expert_batch(inputs.expert[0], inputs.expert_ctx[0])
    task.set_drift(inputs.student[0][:2], inputs.student_ctx[0])
    phases.replay_expert(run, expert, task)
    hidden = phases.measure_merged(run, merged, task)
    assert torch.equal(hidden, merged(inputs.student[0][:2]))
    assert task.drift is hidden  # the drift examples advanced
    merged_drift = phases.drift(hidden, task.expert[0], None)
    assert merged_drift == pytest.approx(
        phases.drift(merged(inputs.student[0][:2]), expert(inputs.expert[0]), None)
    )
    calibrated = copy.deepcopy(merged)
    with torch.no_grad():
        calibrated.out.bias.add_(0.5)
    alone = phases.measure_calibrated(run, calibrated, task, propagated=False)
    phases.propagate(run, calibrated, task)
    assert phases.measure_calibrated(run, calibrated, task, propagated=True) == pytest.approx(
        alone, rel=1e-12
    )
    assert alone != pytest.approx(merged_drift)
