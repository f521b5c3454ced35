"""The CUDA stream operations that the hidden-state streams (featcal.io.offload) are built from,
behind one small object: the streams' ordering (which copy runs on which stream, which event it
waits for, which tensor is kept alive for which stream) is then tested on the CPU against a
fake that logs each call (tests/test_offload.py), and on a GPU against this one."""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor


class DeviceStreams(Protocol):
    """Copies between host memory and one device, ordered by streams and events."""

    def current(self) -> object: ...  # the stream compute runs on
    def side(self) -> object: ...  # the stream copies run on, one per object
    def use(self, stream: object) -> contextlib.AbstractContextManager: ...  # make `stream` current
    def event(self, stream: object) -> object: ...  # an event recorded on `stream` now
    def wait_event(self, stream: object, event: object) -> None: ...  # `stream` waits for `event`
    def wait_stream(self, stream: object, other: object) -> None: ...  # `stream` waits for `other`'s work
    def keep_alive(self, tensor: Tensor, stream: object) -> None: ...  # tensor's memory is not reused
    def on_device(self, tensor: Tensor) -> bool: ...  # whether tensor lives on the device
    def pinned(self, like: Tensor) -> Tensor: ...  # an empty page-locked host tensor shaped like `like`
    def copy(self, dst: Tensor, src: Tensor) -> None: ...  # asynchronous on the current stream
    def to_device(self, host: Tensor) -> Tensor: ...  # asynchronous on the current stream
    def synchronize(self, event: object) -> None: ...  # the host waits for `event`


class CudaStreams:
    """DeviceStreams on one CUDA device, its copies on one side stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._side: torch.cuda.Stream | None = None

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def side(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def use(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def event(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def wait_stream(self, stream: torch.cuda.Stream, other: torch.cuda.Stream) -> None:
        stream.wait_stream(other)

    def keep_alive(self, tensor: Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)

    def on_device(self, tensor: Tensor) -> bool:
        return tensor.is_cuda

    def pinned(self, like: Tensor) -> Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def to_device(self, host: Tensor) -> Tensor:
        return host.to(self.device, non_blocking=True)

    def synchronize(self, event: torch.cuda.Event) -> None:
        event.synchronize()
