"""Capture the inputs of the first block once, and replay any block on them.

A forward pre-hook with kwargs on block 0 records what the model passes to its blocks
(hidden states, attention masks, position embeddings, ...) and stops the forward there, so
the rest of the model never runs. Every later block is called with the same arguments and
the hidden states of the current stream.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

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

        return replace(self, args=tree_map(move, self.args), kwargs=tree_map(move, self.kwargs))

    def pinned(self) -> BlockContext:
        """This context with its tensors copied into page-locked host memory (needs CUDA), from
        wherever they are, once."""

        def pin(value):
            if not isinstance(value, Tensor) or value.is_pinned():
                return value
            return torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value)

        return replace(self, args=tree_map(pin, self.args), kwargs=tree_map(pin, self.kwargs))

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []
        tree_map(lambda v: found.append(v) if isinstance(v, Tensor) else None, (self.args, self.kwargs))
        return found

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def same_context(a: BlockContext, b: BlockContext) -> bool:
    """Whether two contexts hold equal arguments (then one copy serves both streams)."""
    if a.hidden_keyword != b.hidden_keyword:
        return False
    left, right = tree_map(_marker, (a.args, a.kwargs)), tree_map(_marker, (b.args, b.kwargs))
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
    """Run `model` on `batch` up to its first block; return the block's hidden states and context."""
    backbone = adapter.backbone(model)
    first = adapter.blocks(backbone)[0]
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        stop_forward()

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if isinstance(batch, Tensor):
            run_until_stopped(backbone, batch.to(device), **adapter.call_kwargs)
        else:
            inputs, _ = backbone_inputs(adapter, batch)
            inputs = {k: _to(v, device) for k, v in inputs.items()}
            run_until_stopped(backbone, **inputs, **adapter.call_kwargs)
    finally:
        handle.remove()
    if not captured:
        raise FeatCalError(
            f"the forward pass of {type(backbone).__name__} never reached its first block; "
            "check the adapter's `blocks` and `backbone`"
        )
    args, kwargs = captured["args"], dict(captured["kwargs"])
    if args:
        hidden, rest, keyword = args[0], tuple(args[1:]), None
    elif adapter.hidden_argument in kwargs:
        hidden, rest, keyword = kwargs.pop(adapter.hidden_argument), (), adapter.hidden_argument
    else:
        params = list(inspect.signature(first.forward).parameters)
        raise FeatCalError(
            f"cannot find the hidden states among the inputs of {type(first).__name__} "
            f"(parameters {params}); pass them as the first positional argument or as "
            f"`{adapter.hidden_argument}`, or set the adapter's `hidden_argument` or `run_block`"
        )
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise FeatCalError(
            f"the first block of {type(backbone).__name__} receives hidden states of shape "
            f"{getattr(hidden, 'shape', None)}; featcal needs (batch, tokens, hidden)"
        )
    return hidden.detach(), BlockContext(rest, kwargs, keyword)


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
