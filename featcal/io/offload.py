"""Where the hidden-state streams between blocks live: on the compute device, in (pinned) CPU memory,
or on disk as one raw file per batch. Whatever the placement, batches are served on the device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from ..errors import FeatCalError
from .atomic_file import write_error
from .device_streams import CudaStreams, DeviceStreams

PLACEMENTS = ("device", "cpu", "disk")


# Writes of a disk stream in flight at once: each holds a host copy of its batch.
PENDING_WRITES = 2


def _write_batch(path: str, host: Tensor, ready: object | None, streams: DeviceStreams | None) -> None:
    """Write a host batch to its raw file, once the copy that fills it (`ready`) is done."""
    if ready is not None:
        streams.synchronize(ready)
    flat = host.contiguous().reshape(-1).view(torch.uint8)
    try:
        with open(path, "wb") as file:
            file.write(flat.numpy().data)
    except OSError as err:
        if os.path.exists(path):
            os.remove(path)
        raise write_error(path, flat.numel(), err, "give another --offload-dir") from err


class Stream:
    """The hidden states of one stream, one tensor per batch, stored at `placement` and served on `device`.

    - "device": tensors are kept on `device` as given (moved there if elsewhere, not copied otherwise).
    - "cpu": own copies in CPU memory, pinned when `device` is CUDA; a copy from CUDA runs on a side
      stream, after the work that made the value and beside the work that follows.
    - "disk": each batch is written to its own raw file `<directory>/<name>.<index>.bin` by a writer
      thread (at most PENDING_WRITES batches in flight, each a host copy made as for "cpu") and
      memory-mapped to read it; iterating reads the next batch in a reader thread while the current
      one is used. `name` must be unique among the streams sharing `directory`. A failed write is
      raised at the next append, read or `flush`.

    Reading returns a tensor on `device`. For the "device" placement, and for "cpu" on a CPU device, it is
    the stored tensor itself: callers may keep it but must not modify it in place. Otherwise (and always
    for "disk") it is a fresh copy. On CUDA, batch i+1 is copied to the device on the side stream while
    batch i is used. `streams` replaces the CUDA stream operations (tests pass a fake).
    """

    def __init__(
        self,
        placement: str,
        device: torch.device | str,
        directory: str | os.PathLike | None = None,
        name: str = "stream",
        streams: DeviceStreams | None = None,
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
        if streams is None and device.type == "cuda":
            streams = CudaStreams(device)
        self._streams = streams
        self._tensors: list[Tensor] = []  # "device" and "cpu"
        self._ready: list[object | None] = []  # "cpu": the end of an asynchronous copy from the device
        self._files: list[tuple[str, torch.Size, torch.dtype]] = []  # "disk"
        self._writes: list[Future] = []  # "disk": each batch's write
        self._writer: ThreadPoolExecutor | None = None

    def append(self, value: Tensor) -> None:
        """Store batch `len(self)`. Only the "device" placement may keep `value` itself (see the class)."""
        value = value.detach()
        if self.placement == "device":
            self._tensors.append(value.to(self.device))
            return
        self._raise_failed_write()
        if self.placement == "disk" and len(self._writes) >= PENDING_WRITES:
            self._writes[-PENDING_WRITES].result()  # bounds the host copies in flight
        host, ready = self._to_host(value)
        if self.placement == "cpu":
            self._tensors.append(host)
            self._ready.append(ready)
            return
        path = os.path.join(self.directory, f"{self.name}.{len(self._files):06d}.bin")
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"featcal-{self.name}")
        self._files.append((path, value.shape, value.dtype))
        # A function of its arguments, not of the stream: the stream is never freed on the writer.
        self._writes.append(self._writer.submit(_write_batch, path, host, ready, self._streams))

    def _to_host(self, value: Tensor) -> tuple[Tensor, object | None]:
        """A host copy of value that the stream owns, and the event that ends it (None: done)."""
        s = self._streams
        if s is None:
            return value.to("cpu", copy=True), None
        host = s.pinned(value)
        if not s.on_device(value):
            host.copy_(value)
            return host, None
        side = s.side()
        s.wait_stream(side, s.current())  # the value is complete
        with s.use(side):
            s.copy(host, value)
        s.keep_alive(value, side)  # its memory is not reused before the copy is done
        return host, s.event(side)

    def _raise_failed_write(self) -> None:
        for write in self._writes:
            if write.done():
                write.result()

    def flush(self) -> None:
        """Wait for the pending disk writes; raises the first that failed."""
        for write in self._writes:
            write.result()

    def __len__(self) -> int:
        return len(self._files) if self.placement == "disk" else len(self._tensors)

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"batch {i} out of range for stream {self.name!r} of {n} batches")
        return i % n

    def __getitem__(self, i: int) -> Tensor:
        i = self._index(i)
        if self.placement == "device":
            return self._tensors[i]
        host, ready = self._host(i)
        s = self._streams
        if s is None:
            return host
        current = s.current()
        if ready is not None:
            s.wait_event(current, ready)
        return s.to_device(host)

    def _host(self, i: int) -> tuple[Tensor, object | None]:
        """Batch i in host memory (pinned when served on a device), and the event its copy from
        the device ends with (None: none pending)."""
        if self.placement == "cpu":
            return self._tensors[i], self._ready[i]
        self._writes[i].result()
        path, shape, dtype = self._files[i]
        # MAP_PRIVATE mapping, paged in lazily; it is unmapped when `mapped` is freed.
        mapped = torch.from_file(path, shared=False, size=shape.numel(), dtype=dtype).view(shape)
        if self._streams is None:
            return mapped.clone(), None
        host = self._streams.pinned(mapped)
        host.copy_(mapped)
        return host, None

    def _hosts(self) -> Iterator[tuple[Tensor, object | None]]:
        """Every batch from `_host`, in order; for "disk", batch i+1 is read in a thread while i is used."""
        n = len(self)
        if self.placement == "cpu" or n == 0:
            yield from (self._host(i) for i in range(n))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"featcal-{self.name}-read") as reader:
            pending = reader.submit(self._host, 0)
            for i in range(n):
                batch = pending.result()
                if i + 1 < n:
                    pending = reader.submit(self._host, i + 1)
                yield batch

    def __iter__(self) -> Iterator[Tensor]:
        """Batches in order, each copied to the device on the side stream while the one before is used."""
        if self.placement == "device":
            yield from list(self._tensors)
            return
        s = self._streams
        if s is None:
            yield from (host for host, _ in self._hosts())
            return
        side = s.side()

        def start(host: Tensor, ready: object | None) -> tuple[Tensor, object]:
            with s.use(side):
                if ready is not None:
                    s.wait_event(side, ready)
                batch = s.to_device(host)
            return batch, s.event(side)

        hosts = self._hosts()
        pending = next((start(*h) for h in hosts), None)
        while pending is not None:
            batch, copied = pending
            pending = next((start(*h) for h in hosts), None)
            current = s.current()
            s.wait_event(current, copied)
            s.keep_alive(batch, current)  # allocated on the side stream, used on the current one
            yield batch

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
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        for path, _, _ in self._files:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self._files, self._tensors, self._ready, self._writes = [], [], [], []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # partly built, or at interpreter shutdown
            pass
