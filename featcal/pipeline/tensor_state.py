"""State made of named tensors: one ordered list for a collective, a state dict for a file.

A dataclass that inherits `TensorState` declares its tensors as fields holding a tensor, a
list of tensors (one per group member) or a list of such states (one per group); every other
field (the group it belongs to, a method chosen before accumulation) is description, not state.
Two states of one layout line up field by field, so sums made by different work items or
processes add with `add_`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields

from torch import Tensor

from ..errors import FeatCalError


class TensorState:
    """Mixin for dataclasses of named tensors (see the module docstring)."""

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) in field order; list fields give `name.0`, `name.1`, ..."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                yield f.name, value
            elif isinstance(value, list):
                for k, v in enumerate(value):
                    if isinstance(v, Tensor):
                        yield f"{f.name}.{k}", v
                    elif isinstance(v, TensorState):
                        for name, t in v.named_tensors():
                            yield f"{f.name}.{k}.{name}", t

    def tensors(self) -> list[Tensor]:
        """The tensors in a fixed order, e.g. for an all-reduce."""
        return [t for _, t in self.named_tensors()]

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.named_tensors())

    def description(self) -> list:
        """The plain fields (bools, numbers, strings) of this state and the states it holds: what
        must agree, besides the tensors' names, shapes and dtypes, for two states to add."""
        found = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bool, int, float, str)):
                found.append((f.name, value))
            elif isinstance(value, list):
                found += [
                    (f.name, k, v.description()) for k, v in enumerate(value) if isinstance(v, TensorState)
                ]
        return found

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy `state` (as `state_dict` gives it) into these tensors, bit for bit; names, shapes
        and dtypes must match."""
        mine = self.state_dict()
        if set(state) != set(mine):
            missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
            raise FeatCalError(
                f"{type(self).__name__}: state has tensors missing {missing} and unexpected {extra}"
            )
        for name, tensor in mine.items():
            _check_like(self, name, state[name], tensor, "in the state")
        for name, tensor in mine.items():
            tensor.copy_(state[name])

    def add_(self, other: TensorState) -> None:
        """Add another state of the same layout into this one, tensor by tensor."""
        mine, theirs = list(self.named_tensors()), list(other.named_tensors())
        if [n for n, _ in mine] != [n for n, _ in theirs] or self.description() != other.description():
            raise FeatCalError(f"{type(self).__name__}: cannot add states of different layouts")
        for (name, a), (_, b) in zip(mine, theirs):
            _check_like(self, name, b, a, "in the other state")
        for (_, a), (_, b) in zip(mine, theirs):
            a.add_(b)


def _check_like(state: TensorState, name: str, given: Tensor, mine: Tensor, where: str) -> None:
    if given.shape != mine.shape or given.dtype != mine.dtype:
        raise FeatCalError(
            f"{type(state).__name__}: tensor {name!r} is {given.dtype} {tuple(given.shape)} {where} "
            f"but {mine.dtype} {tuple(mine.shape)} here"
        )
