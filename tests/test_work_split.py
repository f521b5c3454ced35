"""Who does what over several processes, and the fingerprint they must agree on."""

from __future__ import annotations

import random

import pytest
import torch

from featcal import FeatCalConfig, FeatCalError
from featcal.models.modules import LINEAR, RMSNORM, ModuleRef
from featcal.pipeline.fingerprint import data_digest, first_difference
from featcal.pipeline.plan import BlockPlan, Group
from featcal.pipeline.solver import BlockSystem
from featcal.pipeline.work import solve_cost, solve_owners, split_work


def test_equal_tasks_go_whole_to_processes():
    work = split_work({f"t{i}": [10, 10, 10] for i in range(4)}, 2)
    assert work.batches == ({"t0": [0, 1, 2], "t1": [0, 1, 2]}, {"t2": [0, 1, 2], "t3": [0, 1, 2]})
    assert work.leader("t2") == 1 and work.ranks_of("t1") == [0]


def test_a_large_task_is_split_and_tokens_balance():
    rng = random.Random(0)
    for _ in range(50):
        tokens = {
            f"t{i}": [rng.randint(1, 100) for _ in range(rng.randint(1, 6))] for i in range(rng.randint(1, 5))
        }
        world = rng.randint(1, 6)
        work = split_work(tokens, world)
        seen = sorted((t, i) for mine in work.batches for t, batch in mine.items() for i in batch)
        assert seen == sorted((t, i) for t, c in tokens.items() for i in range(len(c)))
        order = [
            (list(tokens).index(t), i) for mine in work.batches for t, batch in mine.items() for i in batch
        ]
        assert order == sorted(order)  # contiguous runs, in task order
        for task in tokens:  # the leader holds batch 0; between a task's ranks, none holds another task
            ranks = work.ranks_of(task)
            assert 0 in work.batches[ranks[0]][task]
            assert all(set(work.batches[r]) <= {task} for r in range(ranks[0] + 1, ranks[-1]))
        share = sum(map(sum, tokens.values())) / world
        biggest = max(max(c) for c in tokens.values())
        for rank in range(world):
            assert abs(work.summary(rank)["tokens"] - share) <= biggest


def test_more_processes_than_batches_leaves_some_idle():
    work = split_work({"a": [5], "b": [5]}, 4)
    assert [len(m) for m in work.batches].count(0) == 2


def _plan(widths):
    groups = []
    for d, kind in widths:
        module = torch.nn.Linear(d, d) if kind == LINEAR else torch.nn.RMSNorm(d)
        groups.append(Group(kind, [ModuleRef(f"m{len(groups)}", kind, module)], None))
    return BlockPlan(groups, groups[-1].names[0])


def test_solve_owners_balance_cost_greedily():
    plan = _plan([(8, RMSNORM), (64, LINEAR), (32, LINEAR), (32, LINEAR), (16, LINEAR)])
    owners = solve_owners(plan, 2)
    assert owners[1] == 0  # the largest solve first, to rank 0
    load = [sum(solve_cost(g) for g, o in zip(plan.groups, owners) if o == r) for r in range(2)]
    assert max(load) == solve_cost(plan.groups[1])
    assert solve_owners(plan, 1) == [0] * 5


def test_plan_layout_round_trips_over_another_block():
    plan = _plan([(8, RMSNORM), (16, LINEAR)])
    modules = {
        n: ModuleRef(n, g.kind, torch.nn.Linear(16, 16) if g.kind == LINEAR else torch.nn.RMSNorm(8))
        for g in plan.groups
        for n in g.names
    }
    rebuilt = BlockPlan.from_layout(plan.layout(), modules)
    assert rebuilt.layout() == plan.layout()
    assert rebuilt.groups[1].members[0].module is modules["m1"].module


def test_data_digest_sees_every_byte_and_first_difference_names_the_part():
    batch = {"input_ids": torch.randint(0, 9, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    changed = {k: v.clone() for k, v in batch.items()}
    changed["attention_mask"][1, 4] = 0
    assert data_digest([batch]) == data_digest([{k: v.clone() for k, v in batch.items()}])
    assert data_digest([batch]) != data_digest([changed])
    assert first_difference({"a": "1", "b": "2"}, {"a": "1", "b": "3"}) == "b"
    assert first_difference({"a": "1"}, {"a": "1"}) is None


def test_distributed_settings_are_checked():
    with pytest.raises(FeatCalError, match="distributed='maybe'"):
        FeatCalConfig(distributed="maybe")
    with pytest.raises(FeatCalError, match="distributed_timeout"):
        FeatCalConfig(distributed_timeout=0)


def test_on_without_a_process_group_is_refused():
    from featcal import calibrate

    model = torch.nn.Linear(2, 2)
    with pytest.raises(FeatCalError, match="no torch.distributed process group"):
        calibrate(
            model,
            base=model,
            experts={"a": model},
            data={"a": [torch.zeros(1, 2)]},
            config=FeatCalConfig(distributed="on"),
        )


def test_a_linear_systems_collective_carries_exactly_its_lower_triangle():
    plan = _plan([(37, LINEAR)])
    system = BlockSystem.zeros(plan, torch.float64, torch.device("cpu"))
    system.groups[0].A.copy_(torch.randn(37, 37))
    parts = system.groups[0].collective_tensors()
    carried = sum(t.numel() for t in parts[:-5])  # the panels of A, before B, R, V, s, tokens
    assert 37 * 38 / 2 <= carried <= 0.6 * 37 * 37
    for t in parts:
        t.zero_()  # writes through the views
    A = system.groups[0].A
    assert torch.equal(A.tril(), torch.zeros_like(A)) and A.triu(1).abs().sum() > 0
