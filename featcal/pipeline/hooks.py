"""The forward hooks of the accumulate phase (docs/algorithm.md s.2).

On the expert block, hooks cache the module inputs and outputs the statistics need; on the
merged block, pre-hooks feed each group's input straight into the sums, so no activation
outlives its batch, and stop the forward at the plan's last module. A fused experts module has
one pre-hook for all its routed groups, which reads the merged model's routing from its call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from ..errors import FeatCalError, Location
from ..models.capture import stop_forward
from ..models.modules import LINEAR, ModuleRef
from .plan import BlockPlan
from .statistics import Accumulator, ExpertCache


def module_input(args: tuple, kwargs: dict) -> Tensor:
    """The input tensor of a module call, positional or keyword."""
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


def _routed_call(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """The (tokens, d) input and the (tokens, top_k) expert indices of a fused experts call."""
    hidden = args[0] if args else kwargs["hidden_states"]
    routes = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden, routes


@contextmanager
def expert_hooks(modules: dict[str, ModuleRef], cache: ExpertCache) -> Iterator[None]:
    """While active, every forward of the expert block fills `cache` (and, with
    `cache.stop_early`, stops once the cache is complete)."""

    def stop_if_complete() -> None:
        if cache.stop_early and cache.complete():
            stop_forward()

    def on_input(name):
        read = (lambda a, k: _routed_call(a, k)[0]) if modules[name].routed else module_input

        def hook(module, args, kwargs):
            cache.on_input(name, read(args, kwargs))
            stop_if_complete()

        return hook

    def on_output(name):
        def hook(module, args, output):
            cache.on_output(name, output if isinstance(output, Tensor) else output[0])  # router: logits
            stop_if_complete()

        return hook

    handles = []
    try:
        for name, ref in modules.items():
            handles.append(ref.module.register_forward_pre_hook(on_input(name), with_kwargs=True))
            if ref.kind == LINEAR and not ref.routed:
                handles.append(ref.module.register_forward_hook(on_output(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def student_hooks(
    plan: BlockPlan, modules: dict[str, ModuleRef], stats: Accumulator, where: Location
) -> Iterator[None]:
    """While active, a forward of the merged block accumulates `stats` and stops after plan.last."""
    leader_inputs: dict[int, Tensor] = {}

    def hook_for(i: int, name: str, leader: bool):
        def hook(module, args, kwargs):
            x = module_input(args, kwargs)
            if leader:
                stats.accumulate(i, x)
                leader_inputs[i] = x
            elif leader_inputs.get(i) is not x:
                raise FeatCalError(
                    f"{where}: module {name!r} no longer reads the same input as "
                    f"{plan.groups[i].leader.name!r}, as it did in the first batch"
                )
            if name == plan.last:
                leader_inputs.clear()
                stop_forward()

        return hook

    def routed_hook(indices: list[int]):
        names = {n for i in indices for n in plan.groups[i].names}

        def hook(module, args, kwargs):
            stats.accumulate_routed(indices, *_routed_call(args, kwargs))
            if plan.last in names:
                leader_inputs.clear()
                stop_forward()

        return hook

    handles = []
    routed: dict[int, tuple[object, list[int]]] = {}  # fused experts module -> its groups
    try:
        for i, group in enumerate(plan.groups):
            if group.leader.routed:
                module = modules[group.leader.name].module
                routed.setdefault(id(module), (module, []))[1].append(i)
                continue
            for k, name in enumerate(group.names):
                module = modules[name].module
                handles.append(module.register_forward_pre_hook(hook_for(i, name, k == 0), with_kwargs=True))
        for module, indices in routed.values():
            handles.append(module.register_forward_pre_hook(routed_hook(indices), with_kwargs=True))
        yield
    finally:
        leader_inputs.clear()
        for handle in handles:
            handle.remove()
