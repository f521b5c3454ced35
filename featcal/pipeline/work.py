"""Who does what when a run is spread over processes (docs/algorithm.md s.10).

The unit of work is a (task, batch) pair, weighed by its tokens. The pairs, in task order, are
cut into one contiguous run per process of about equal tokens: a process holds few tasks
(often one, and opens only their experts), and a task larger than its share is split over
neighbouring processes. The first process of a task (its leader) holds its batch 0: it measures
the task's drift and folds the task's reduced sums. The solve of each module group is owned by
one process, chosen greedily by solve cost (largest first, to the least loaded process).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..models.modules import LINEAR
from .plan import BlockPlan, Group


@dataclass(frozen=True)
class WorkPlan:
    """Per process, the task batches it works on: `batches[rank][task]` = global batch indices."""

    batches: tuple[dict[str, list[int]], ...]
    tokens: Mapping[str, Sequence[int]]  # per task, the tokens of each batch (padding included)

    @property
    def world(self) -> int:
        return len(self.batches)

    def ranks_of(self, task: str) -> list[int]:
        """The processes that work on `task`, in order (the first is its leader)."""
        return [r for r, mine in enumerate(self.batches) if task in mine]

    def leader(self, task: str) -> int:
        return self.ranks_of(task)[0]

    def summary(self, rank: int) -> dict:
        """What the report says of one process's work."""
        mine = self.batches[rank]
        tokens = sum(self.tokens[t][i] for t, indices in mine.items() for i in indices)
        return {
            "rank": rank,
            "tasks": list(mine),
            "batches": sum(len(v) for v in mine.values()),
            "tokens": tokens,
        }


def split_work(tokens: Mapping[str, Sequence[int]], world: int) -> WorkPlan:
    """Cut the (task, batch) pairs, in order, into `world` contiguous runs of about equal tokens:
    a pair goes to the process whose share of the token line holds the pair's midpoint. With
    fewer pairs than processes some processes get none."""
    total = sum(sum(t) for t in tokens.values())
    batches: list[dict[str, list[int]]] = [{} for _ in range(world)]
    before = 0
    for task, counts in tokens.items():
        for i, n in enumerate(counts):
            rank = min(world - 1, int((before + n / 2) * world / max(total, 1)))
            batches[rank].setdefault(task, []).append(i)
            before += n
    return WorkPlan(tuple(batches), {t: list(c) for t, c in tokens.items()})


def solve_cost(group: Group) -> float:
    """Flops of a group's solve: a Cholesky of A (d^3 / 3) and two triangular solves of its
    right-hand sides (2 d^2 D); a norm group's per-channel solve is linear in d."""
    d = group.d_in
    if group.kind == LINEAR:
        return d**3 / 3 + 2 * d * d * group.d_out
    return 10.0 * d * len(group.members)


def solve_owners(plan: BlockPlan, world: int) -> list[int]:
    """The process that solves each group of the plan, balancing the solve cost greedily."""
    load = [0.0] * world
    owners = [0] * len(plan.groups)
    for g in sorted(range(len(plan.groups)), key=lambda g: -solve_cost(plan.groups[g])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[g] = rank
        load[rank] += solve_cost(plan.groups[g])
    return owners
