"""Capture the inputs of the first block once, and replay any block on them.

A forward pre-hook with kwargs on block 0 records what the model passes to its blocks
(hidden states, attention masks, position embeddings, ...) and stops the forward there, so
the rest of the model never runs. Every later block is called with the same arguments and
the hidden states of the current stream.

Models whose layers are of several types (`config.layer_types`: sliding-window and full
attention, Gemma 3's local and global rotary embeddings) pass each type its own arguments:
the first block of each type is hooked too, the blocks before it are bypassed (their forward
returns its hidden states untouched, so no weight is read), and block i is replayed with the
arguments of its type (`BlockContext.for_block`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..errors import FeatCalError, Location
from ..ops import accumulator_dtype
from .adapters import Batch, ModelAdapter


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class BlockContext:
    """Everything a block receives besides its hidden states, for one batch."""

    args: tuple
    kwargs: dict
    # The keyword the block takes its hidden states by; None: the first positional argument.
    hidden_keyword: str | None = None
    # The type of each block (config.layer_types) when the types receive different arguments;
    # args and kwargs are those of block 0's type, by_type[kind] those of every other type.
    layer_types: tuple[str, ...] = ()
    by_type: dict[str, tuple[tuple, dict]] = field(default_factory=dict)

    def for_block(self, index: int) -> BlockContext:
        """The arguments block `index` of the stage receives (those of its layer type)."""
        if not self.by_type or self.layer_types[index] == self.layer_types[0]:
            return self
        args, kwargs = self.by_type[self.layer_types[index]]
        return BlockContext(args, kwargs, self.hidden_keyword)

    def _tree(self) -> tuple:
        return self.args, self.kwargs, self.by_type

    def _mapped(self, fn) -> BlockContext:
        args, kwargs, by_type = tree_map(fn, self._tree())
        return replace(self, args=args, kwargs=kwargs, by_type=by_type)

    def arguments(self, hidden: Tensor) -> tuple[tuple, dict]:
        """The block's (args, kwargs) with `hidden`, the captured tensors moved to its device."""
        ctx = self.to(hidden.device)
        if self.hidden_keyword is not None:
            return ctx.args, {**ctx.kwargs, self.hidden_keyword: hidden}
        return (hidden, *ctx.args), ctx.kwargs

    def to(self, device: torch.device) -> BlockContext:
        """This context with its tensors on `device` (itself when they are there already)."""
        if all(t.device == device for t in self.tensors()):
            return self

        def move(value):
            # Asynchronous only toward a GPU: a non-blocking copy to the host could be read too early.
            return (
                value.to(device, non_blocking=device.type == "cuda") if isinstance(value, Tensor) else value
            )

        return self._mapped(move)

    def pinned(self) -> BlockContext:
        """This context with its tensors copied into page-locked host memory (needs CUDA), from
        wherever they are, once."""

        def pin(value):
            if not isinstance(value, Tensor) or value.is_pinned():
                return value
            return torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value)

        return self._mapped(pin)

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []
        tree_map(lambda v: found.append(v) if isinstance(v, Tensor) else None, self._tree())
        return found

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def same_context(a: BlockContext, b: BlockContext) -> bool:
    """Whether two contexts hold equal arguments (then one copy serves both streams)."""
    if a.hidden_keyword != b.hidden_keyword or a.layer_types != b.layer_types:
        return False
    left, right = tree_map(_marker, a._tree()), tree_map(_marker, b._tree())
    if left != right:
        return False
    pairs = zip(a.tensors(), b.tensors())
    return all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in pairs)


def _marker(value):
    return "tensor" if isinstance(value, Tensor) else value


def run_block(adapter: ModelAdapter, block: nn.Module, hidden: Tensor, ctx: BlockContext) -> Tensor:
    """The output hidden states of `block` on `hidden` with the captured arguments `ctx`."""
    args, kwargs = ctx.arguments(hidden)
    return adapter.run_block(block, args, kwargs)


def stop_forward() -> None:
    raise _StopForward


def run_until_stopped(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Call fn, treating an early stop raised by a hook as normal completion."""
    try:
        fn(*args, **kwargs)
    except _StopForward:
        pass


def backbone_inputs(adapter: ModelAdapter, batch: Batch) -> tuple[dict, list[str]]:
    """The keyword inputs the adapter passes to its backbone, and the batch keys it drops."""
    if not isinstance(batch, Mapping):
        raise FeatCalError("a batch must be a tensor or a dict of tensors")
    if adapter.inputs is None:
        return dict(batch), []
    kept = {k: v for k, v in batch.items() if k in adapter.inputs}
    return kept, sorted(k for k in batch if k not in adapter.inputs)


def capture_first_block_inputs(
    adapter: ModelAdapter, model: nn.Module, batch: Batch, device: torch.device
) -> tuple[Tensor, BlockContext]:
    """Run `model` on `batch` up to its first block (up to the first block of each layer type);
    return the first block's hidden states and the context of every block."""
    backbone = adapter.backbone(model)
    blocks = adapter.blocks(backbone)
    types = _layer_types(adapter, backbone, len(blocks))
    firsts = {kind: types.index(kind) for kind in types} if types else {None: 0}
    last = max(firsts.values())
    captured: dict[int, tuple[tuple, dict]] = {}

    def hook_for(index: int):
        def hook(module, args, kwargs):
            captured[index] = args, dict(kwargs)
            if index == last:
                stop_forward()

        return hook

    handles = [blocks[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in firsts.values()]
    try:
        with _bypassed(blocks[:last], adapter.hidden_argument):
            if isinstance(batch, Tensor):
                run_until_stopped(backbone, batch.to(device), **adapter.call_kwargs)
            else:
                inputs, _ = backbone_inputs(adapter, batch)
                inputs = {k: _to(v, device) for k, v in inputs.items()}
                run_until_stopped(backbone, **inputs, **adapter.call_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) < len(firsts):
        raise FeatCalError(
            f"the forward pass of {type(backbone).__name__} never reached its first block; "
            "check the adapter's `blocks` and `backbone`"
        )
    hidden, args, kwargs, keyword = _split_hidden(adapter, blocks[0], *captured[0])
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise FeatCalError(
            f"the first block of {type(backbone).__name__} receives hidden states of shape "
            f"{getattr(hidden, 'shape', None)}; featcal needs (batch, tokens, hidden)"
        )
    by_type = {
        kind: _split_hidden(adapter, blocks[i], *captured[i])[1:3] for kind, i in firsts.items() if i > 0
    }
    return hidden.detach(), BlockContext(args, kwargs, keyword, types if by_type else (), by_type)


def _layer_types(adapter: ModelAdapter, backbone: nn.Module, count: int) -> tuple[str, ...]:
    """The type of each block when the model has several (else ()), checked against the blocks."""
    types = tuple(adapter.layer_types(backbone) or ())
    if len(set(types)) < 2:
        return ()
    if len(types) != count:
        raise FeatCalError(
            f"{type(backbone).__name__} names {len(types)} layer types (config.layer_types) for "
            f"{count} blocks"
        )
    return types


@contextmanager
def _bypassed(blocks: Sequence[nn.Module], hidden_argument: str) -> Iterator[None]:
    """While active, each of `blocks` returns the hidden states it is given (its weights unread)."""

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs[hidden_argument]

    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = passthrough
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _split_hidden(
    adapter: ModelAdapter, block: nn.Module, args: tuple, kwargs: dict
) -> tuple[Tensor, tuple, dict, str | None]:
    """(hidden states, the other args, the other kwargs, the hidden states' keyword or None)."""
    if args:
        return args[0], tuple(args[1:]), kwargs, None
    if adapter.hidden_argument in kwargs:
        kwargs = dict(kwargs)
        return kwargs.pop(adapter.hidden_argument), (), kwargs, adapter.hidden_argument
    params = list(inspect.signature(block.forward).parameters)
    raise FeatCalError(
        f"cannot find the hidden states among the inputs of {type(block).__name__} "
        f"(parameters {params}); pass them as the first positional argument or as "
        f"`{adapter.hidden_argument}`, or set the adapter's `hidden_argument` or `run_block`"
    )


def token_weights(
    adapter: ModelAdapter, batch: Batch, hidden: Tensor, memory: bool = False, where: Location | None = None
) -> Tensor | None:
    """Per-token weights (batch, tokens) of a batch from its padding mask (with `memory`, of the
    encoder output a decoder reads); None when all weigh 1. `where` names the batch in errors."""
    mask = (adapter.encdec.memory_mask if memory else adapter.token_mask)(batch)
    if mask is None:
        return None
    if not memory and tuple(mask.shape) != tuple(hidden.shape[:2]):
        prefix = "" if where is None else f"{where}: "
        raise FeatCalError(
            f"{prefix}the token mask of shape {tuple(mask.shape)} does not match the hidden states of "
            f"shape {tuple(hidden.shape)} (batch, tokens, hidden)"
        )
    if bool((mask == 1).all()):  # read where the mask is (a host sync only for a mask on the GPU)
        return None
    return mask.to(device=hidden.device, dtype=accumulator_dtype(hidden.dtype))


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, Tensor) else value
