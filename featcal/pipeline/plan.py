"""The module groups of a block (docs/algorithm.md s.4): which calibrated modules share an input.

Modules that read the same input tensor with the same token weighting form a group and share
one Gram (q/k/v; gate/up). The groups are found once per block by watching one forward pass
of an expert block; a plan can be cut to some of its groups: with sequential statistics
(docs/algorithm.md s.12) a block is solved in steps, each on the groups `BlockPlan.steps` gives
it, with inputs produced by the groups the steps before it solved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from ..errors import FeatCalError, Location
from ..models.modules import LINEAR, ModuleRef


@dataclass
class Group:
    """Calibrated modules of a block that read one input tensor with one token weighting."""

    kind: str
    members: list[ModuleRef]
    focus: float | None
    memory: bool = False  # reads the encoder output (T5 cross-attention keys and values)
    token_axis: int = 1  # of an input of more than three dimensions (per-head norms)

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
    """The groups of a block in forward order; `last` is the last of their modules to be called
    (the merged forward stops after it), `skipped` the calibrated modules never called."""

    groups: list[Group]
    last: str
    skipped: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # call order of the modules (default: by group)

    def only(self, indices: Sequence[int]) -> BlockPlan:
        """The plan of some of the groups, in their order; the forward stops after the last of them."""
        groups = [self.groups[i] for i in indices]
        if not groups:
            raise FeatCalError("BlockPlan.only: no groups chosen")
        names = {n for g in groups for n in g.names}
        order = [n for n in (self.order or [n for g in self.groups for n in g.names]) if n in names]
        return BlockPlan(groups, order[-1], [], order)

    def steps(
        self,
        sequential: str,
        post_norm: Callable[[str], bool],
        inner_norm: Callable[[str], bool] = lambda name: False,
    ) -> list[list[int]]:
        """The groups of each step of the block, in forward order (docs/algorithm.md s.12).

        "off": one step. "group": one per group. "sublayer": a sub-layer (attention, MLP, T5's
        cross-attention) opens at a norm that follows a linear group of the current one, and
        closes after a norm for which `post_norm(name)` holds: one applied to the sub-layer's
        output (BERT's; Gemma's post-attention norm) rather than to its input. A norm for which
        `inner_norm(name)` holds (per-head query and key norms) stays inside its sub-layer.
        """
        indices = list(range(len(self.groups)))
        if sequential == "off":
            return [indices]
        if sequential == "group":
            return [[i] for i in indices]
        steps: list[list[int]] = []
        opens = True
        for i, group in enumerate(self.groups):
            norm = group.kind != LINEAR
            is_post = norm and post_norm(group.leader.name)
            inner = norm and inner_norm(group.leader.name)
            has_linear = bool(steps) and any(self.groups[j].kind == LINEAR for j in steps[-1])
            if opens or (norm and not is_post and not inner and has_linear):
                steps.append([])
            steps[-1].append(i)
            opens = is_post
        return steps

    def layout(self) -> tuple:
        """The plan by module names alone (no tensors, no modules): what another process needs
        to rebuild it over its own copy of the block (`from_layout`)."""
        groups = tuple((g.kind, tuple(g.names), g.focus, g.memory, g.token_axis) for g in self.groups)
        return groups, self.last, tuple(self.skipped), tuple(self.order)

    @classmethod
    def from_layout(cls, layout: tuple, modules: dict[str, ModuleRef]) -> BlockPlan:
        """The plan of `layout` over the block whose calibrated modules are `modules`."""
        groups, last, skipped, order = layout
        rebuilt = [
            Group(kind, [modules[n] for n in names], focus, memory, axis)
            for kind, names, focus, memory, axis in groups
        ]
        return cls(rebuilt, last, list(skipped), list(order))


def discover_plan(
    order: list[str],
    inputs: dict[str, Tensor],
    modules: dict[str, ModuleRef],
    focus: Callable[[str], float | None],
    where: Location,
    memory: Callable[[str], bool] | None = None,
    token_axis: Callable[[str], int] | None = None,
) -> BlockPlan:
    """Group the modules called in `order` (one forward) by identical input tensor, kind, focus,
    token set (`memory(name)`: the module reads the encoder output, weighted by its mask) and
    token axis. Each routed expert's map is a group of its own (its tokens are its own)."""
    if not order:
        raise FeatCalError(
            f"{where}: the block's forward calls none of its calibrated modules {list(modules)}"
        )
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
        axis = token_axis(name) if token_axis else 1
        eps = None if ref.kind == LINEAR else ref.norm_eps()
        key = (ref.kind, eps, focus(name), reads_memory, axis, ref.name if ref.routed else None)
        group = next((g for k, gx, g in found if k == key and gx is x), None)
        if group is None:
            found.append((key, x, Group(ref.kind, [ref], key[2], reads_memory, axis)))
        else:
            group.members.append(ref)
    skipped = [name for name in modules if name not in order]
    return BlockPlan([g for _, _, g in found], order[-1], skipped, list(order))


def choose_method(group: Group, tokens: int, alpha: float, requested: str) -> str:
    """'cross' or 'project' for a linear group: the requested one, or for 'auto' the cheaper.

    `tokens` is the task's token count over all its batches (wherever they are processed).
    flops per task: cross 2 n d^2 + 2 d^2 D; project 2 n d D + min(2 n d D, 2 d^2 D) (D = sum d_out).
    """
    if requested != "auto":
        return requested
    n, d, big_d = tokens, group.d_in, group.d_out
    cross = 2 * n * d * d + 2 * d * d * big_d
    project = 2 * n * d * big_d + (0 if alpha == 1 else 2 * d * big_d * min(n, d))
    return "cross" if cross <= project else "project"
