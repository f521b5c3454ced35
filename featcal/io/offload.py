"""Where the hidden-state streams between blocks live: on the compute device, in (pinned) CPU memory,
or on disk as one raw file per batch. Whatever the placement, batches are served on the device."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import FeatCalError
from .atomic_file import write_error

PLACEMENTS = ("device", "cpu", "disk")


class Stream:
    """The hidden states of one stream, one tensor per batch, stored at `placement` and served on `device`.

    - "device": tensors are kept on `device` as given (moved there if elsewhere, not copied otherwise).
    - "cpu": own copies in CPU memory, pinned when `device` is CUDA; a copy from CUDA is asynchronous.
    - "disk": each batch is written to its own raw file `<directory>/<name>.<index>.bin` and memory-mapped
      to read it; `name` must be unique among the streams sharing `directory`.

    Reading returns a tensor on `device`. For the "device" placement, and for "cpu" on a CPU device, it is
    the stored tensor itself: callers may keep it but must not modify it in place. Otherwise (and always
    for "disk") it is a fresh copy.
    """

    def __init__(
        self,
        placement: str,
        device: torch.device | str,
        directory: str | os.PathLike | None = None,
        name: str = "stream",
    ) -> None:
        if placement not in PLACEMENTS:
            raise FeatCalError(f"unknown stream placement {placement!r}: expected one of {PLACEMENTS}")
        if placement == "disk" and directory is None:
            raise FeatCalError("stream placement 'disk' needs a directory for its files")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.placement, self.device, self.name = placement, device, name
        self.directory = None if directory is None else os.fspath(directory)
        if placement == "disk":
            os.makedirs(self.directory, exist_ok=True)
        self._tensors: list[Tensor] = []  # "device" and "cpu"
        self._ready: list[torch.cuda.Event | None] = []  # "cpu": end of an asynchronous copy from CUDA
        self._files: list[tuple[str, torch.Size, torch.dtype]] = []  # "disk"

    def append(self, value: Tensor) -> None:
        """Store batch `len(self)`. Only the "device" placement may keep `value` itself (see the class)."""
        value = value.detach()
        if self.placement == "device":
            self._tensors.append(value.to(self.device))
        elif self.placement == "cpu":
            pinned = self.device.type == "cuda"
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
            host.copy_(value, non_blocking=pinned)
            ready = None
            if pinned and value.is_cuda:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(value.device))
            self._tensors.append(host)
            self._ready.append(ready)
        else:
            path = os.path.join(self.directory, f"{self.name}.{len(self._files):06d}.bin")
            flat = value.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            try:
                with open(path, "wb") as file:
                    file.write(flat.numpy().data)
            except OSError as err:
                if os.path.exists(path):
                    os.remove(path)
                raise write_error(path, flat.numel(), err, "give another --offload-dir") from err
            self._files.append((path, value.shape, value.dtype))

    def __len__(self) -> int:
        return len(self._files) if self.placement == "disk" else len(self._tensors)

    def __getitem__(self, i: int) -> Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"batch {i} out of range for stream {self.name!r} of {n} batches")
        i %= n
        if self.placement == "device":
            return self._tensors[i]
        if self.placement == "cpu":
            if self.device.type != "cuda":
                return self._tensors[i]
            if self._ready[i] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._ready[i])
            return self._tensors[i].to(self.device, non_blocking=True)
        path, shape, dtype = self._files[i]
        # MAP_PRIVATE mapping, paged in lazily; it is unmapped when `mapped` is freed.
        mapped = torch.from_file(path, shared=False, size=shape.numel(), dtype=dtype).view(shape)
        return mapped.clone() if self.device.type == "cpu" else mapped.to(self.device)

    def __iter__(self) -> Iterator[Tensor]:
        """Batches in order. For "cpu" on CUDA, batch i+1 is copied on a side stream while i is used."""
        if self.placement != "cpu" or self.device.type != "cuda" or len(self) == 0:
            for i in range(len(self)):
                yield self[i]
            return
        side = torch.cuda.Stream(self.device)
        pending = self._prefetch(0, side)
        for i in range(len(self)):
            batch, copied = pending
            if i + 1 < len(self):
                pending = self._prefetch(i + 1, side)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            batch.record_stream(current)  # allocated on `side`, used on `current`
            yield batch

    def _prefetch(self, i: int, side: torch.cuda.Stream) -> tuple[Tensor, torch.cuda.Event]:
        """Start copying batch i to the device on `side`; returns the tensor and the copy's end event."""
        with torch.cuda.stream(side):
            if self._ready[i] is not None:
                side.wait_event(self._ready[i])
            batch = self._tensors[i].to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        return batch, copied

    def shapes(self) -> list[tuple[int, ...]]:
        if self.placement == "disk":
            return [tuple(shape) for _, shape, _ in self._files]
        return [tuple(t.shape) for t in self._tensors]

    @property
    def nbytes(self) -> int:
        """Bytes of the batches held at the placement (pinned allocations may round up beyond this)."""
        if self.placement == "disk":
            return sum(shape.numel() * dtype.itemsize for _, shape, dtype in self._files)
        return sum(t.numel() * t.element_size() for t in self._tensors)

    def close(self) -> None:
        """Free the tensors and delete the files; the stream is then empty. Idempotent."""
        for path, _, _ in self._files:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self._files, self._tensors, self._ready = [], [], []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # partly built, or at interpreter shutdown
            pass
