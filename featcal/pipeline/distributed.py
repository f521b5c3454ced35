"""The processes of one run and what they say to each other, over torch.distributed
(docs/algorithm.md s.10).

The driver talks to a `Collectives`. The base class is one process alone: every collective is
the identity and an error is raised where it happens, so a single process runs exactly as it
would without this module. `ProcessGroupCollectives` spreads the run over the processes of
the default group (NCCL on GPUs, gloo on CPUs; started by torchrun, or by the caller's
`init_process_group`):

- tensors (a task's raw sums, the block systems, the solved parameters) travel on a group of
  the default backend, small ones coalesced into one buffer per dtype; a task shared by some
  processes has a group of its own;
- status and small objects (plans, drift numbers, fingerprints) travel on a gloo group, with
  the checks;
- every phase ends with `check`: each process says whether it failed, and if any did, every
  process raises the same `DistributedError`, naming the rank where the first failure happened.
  Between checks a failed process skips its work (`ok` is False) but still joins every
  collective, so no process is left waiting. Work outside a `guard` that fails on one process
  alone (the merged block unreadable there) leaves the others waiting until the timeout;
- every collective has the run's timeout; waiting past it, or losing a process, is an error
  that names the phase that was waiting.
"""

from __future__ import annotations

import datetime
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import FeatCalError
from .checks import check_device
from .work import WorkPlan

BUCKET_ELEMENTS = 1 << 20  # tensors at least this large travel alone, not in a coalesced buffer


class DistributedError(FeatCalError):
    """A process of the run failed, or stopped answering. `shared`: every process raises this
    same message (a failure reported at a check, a disagreement); else only this one does (it
    lost the others)."""

    def __init__(self, message: str, *, rank: int, shared: bool = True) -> None:
        super().__init__(message)
        self.rank, self.shared = rank, shared  # `rank`: the process that raises it


class Collectives:
    """One process alone (see the module docstring)."""

    rank, world, backend = 0, 1, None

    def __init__(self) -> None:
        self.seconds = 0.0  # spent in collectives, waiting for others included
        self.seconds_by_phase: dict[str, float] = {}  # by the phase's first word
        self.work: WorkPlan | None = None

    @property
    def ok(self) -> bool:
        """Whether this process has not failed since the last check."""
        return True

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around work that may fail: in one process the error is raised at once."""
        yield

    def check(self, phase: str, payload=None) -> list:
        """End of a phase: every process's `payload`, by rank; raises if a process failed."""
        return [payload]

    @contextmanager
    def step(self, phase: str) -> Iterator[None]:
        """guard, then check."""
        with self.guard():
            yield
        self.check(phase)

    def set_work(self, work: WorkPlan) -> None:
        self.work = work

    def task_all_reduce(self, task: str, phase: str) -> Callable[[list[Tensor]], None] | None:
        """The in-place sum over the processes that share `task` (None: only this one has it)."""
        return None

    def reduce_to(self, owner: int, tensors: Sequence[Tensor], phase: str) -> None:
        """Sum `tensors` over all processes into those of `owner`."""

    def broadcast_from(self, owner: int, tensors: Sequence[Tensor], phase: str) -> None:
        """Copy `owner`'s `tensors` into every process's."""

    def close(self) -> None:
        pass


class ProcessGroupCollectives(Collectives):
    """The processes of the default torch.distributed group (see the module docstring)."""

    def __init__(self, timeout_seconds: float) -> None:
        super().__init__()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = str(dist.get_backend())
        self.timeout = float(timeout_seconds)
        timeout = datetime.timedelta(seconds=self.timeout)
        self._control = dist.new_group(backend="gloo", timeout=timeout)
        self._data = dist.new_group(timeout=timeout)
        self._groups: dict[tuple[int, ...], object] = {}
        self._failure: tuple[float, int, str] | None = None  # (time, rank, message)
        self._error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self._failure is None

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except DistributedError:  # already known to every process, or the others are lost
            raise
        except Exception as err:  # reported to every process at the next check
            if self._failure is None:
                message = str(err) if isinstance(err, FeatCalError) else f"{type(err).__name__}: {err}"
                self._failure, self._error = (time.time(), self.rank, message), err

    def check(self, phase: str, payload=None) -> list:
        gathered: list = [None] * self.world
        with self._waiting(phase):
            dist.all_gather_object(gathered, (self._failure, payload), group=self._control)
        failures = sorted(f for f, _ in gathered if f is not None)
        if failures:
            _, rank, message = failures[0]
            cause = self._error if rank == self.rank else None
            raise DistributedError(
                f"rank {rank} of {self.world} failed: {message}", rank=self.rank
            ) from cause
        return [p for _, p in gathered]

    def set_work(self, work: WorkPlan) -> None:
        """Make the groups of the processes that share a task (every process, in one order)."""
        super().set_work(work)
        timeout = datetime.timedelta(seconds=self.timeout)
        for task in work.tokens:
            ranks = tuple(work.ranks_of(task))
            if len(ranks) > 1 and ranks not in self._groups:
                whole = len(ranks) == self.world
                self._groups[ranks] = self._data if whole else dist.new_group(list(ranks), timeout=timeout)

    def task_all_reduce(self, task: str, phase: str) -> Callable[[list[Tensor]], None] | None:
        assert self.work is not None
        ranks = tuple(self.work.ranks_of(task))
        if len(ranks) == 1:
            return None
        group = self._groups[ranks]

        def all_reduce(tensors: list[Tensor]) -> None:
            self._each(tensors, lambda t: dist.all_reduce(t, group=group), phase, receives=True)

        return all_reduce

    def reduce_to(self, owner: int, tensors: Sequence[Tensor], phase: str) -> None:
        op = lambda t: dist.reduce(t, dst=owner, group=self._data)  # noqa: E731
        self._each(tensors, op, phase, receives=self.rank == owner)

    def broadcast_from(self, owner: int, tensors: Sequence[Tensor], phase: str) -> None:
        op = lambda t: dist.broadcast(t, src=owner, group=self._data)  # noqa: E731
        self._each(tensors, op, phase, receives=self.rank != owner)

    def close(self) -> None:
        if self.backend == "nccl":
            torch.cuda.synchronize()  # the last broadcast is finished before its communicator goes
        groups = {id(g): g for g in [*self._groups.values(), self._data, self._control]}
        for group in groups.values():
            dist.destroy_process_group(group)
        self._groups = {}

    def _each(
        self, tensors: Sequence[Tensor], op: Callable[[Tensor], object], phase: str, receives: bool
    ) -> None:
        """`op` in place on every tensor: large ones alone (a non-contiguous one through its own
        copy), small ones coalesced into one buffer per dtype and device; copied back where this
        process `receives` the result (a process that only sends keeps its copies' tensors as
        they were)."""
        small: dict[tuple, list[Tensor]] = defaultdict(list)
        for t in tensors:
            if t.numel() < BUCKET_ELEMENTS:
                small[(t.dtype, t.device)].append(t)
                continue
            buffer = t if t.is_contiguous() else t.contiguous()  # a band of a matrix: its own copy
            with self._waiting(phase):
                op(buffer)
            if receives and buffer is not t:
                t.copy_(buffer)
        for group in small.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            with self._waiting(phase):
                op(flat)
            if not receives:
                continue
            start = 0
            for t in group:
                t.copy_(flat[start : start + t.numel()].view_as(t))
                start += t.numel()

    @contextmanager
    def _waiting(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
            if self.backend == "nccl":  # NCCL returns once queued: wait, so the time is the wait
                torch.cuda.synchronize()
        except RuntimeError as err:  # a timeout, a lost process, a backend failure
            waited = time.perf_counter() - started
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {phase}: the collective failed after {waited:.0f} s "
                f"of waiting for the other processes (timeout {self.timeout:.0f} s); a process may "
                f"have died or be stuck, its own output says why ({type(err).__name__}: {err})",
                rank=self.rank,
                shared=False,
            ) from err
        finally:
            waited = time.perf_counter() - started
            self.seconds += waited
            kind = phase.split(" ", 1)[0]
            self.seconds_by_phase[kind] = self.seconds_by_phase.get(kind, 0.0) + waited


def open_collectives(mode: str, timeout_seconds: float) -> Collectives:
    """`mode` "auto": the default process group when one is initialised with more than one
    process, else one process alone; "on": the default group, which must exist; "off": alone."""
    initialised = dist.is_available() and dist.is_initialized()
    if mode == "on" and not initialised:
        raise FeatCalError(
            "distributed='on' but no torch.distributed process group is initialised: start the run "
            "with torchrun, or call torch.distributed.init_process_group first"
        )
    if mode == "off" or not initialised or dist.get_world_size() == 1:
        return Collectives()
    return ProcessGroupCollectives(timeout_seconds)


def process_device(device: str | torch.device | None, comm: Collectives) -> torch.device | None:
    """A process's device: "cuda" without an index means this process's LOCAL_RANK GPU (modulo
    the GPUs it sees, for launchers that show each process one), made the current device. NCCL
    moves CUDA tensors only, gloo CPU tensors only (its reduce has no CUDA version). An unknown
    device, or CUDA where this torch has none, is an error naming the value."""
    device = check_device(device)
    if comm.world > 1 and device is not None and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_gpu())
        torch.cuda.set_device(device)  # Triton launches and NCCL buffers go to the current device
    on_gpu = device is not None and device.type == "cuda"
    if comm.backend == "nccl" and not on_gpu:
        raise FeatCalError(
            f"the process group uses NCCL, which moves GPU tensors only, but rank {comm.rank} "
            f"runs on {device or 'the model’s device'}: give device='cuda' (--device cuda), or "
            "initialise the group with gloo to run on CPUs"
        )
    if comm.backend == "gloo" and on_gpu:
        raise FeatCalError(
            f"the process group uses gloo, which cannot reduce GPU tensors, but rank {comm.rank} runs "
            f"on {device}: initialise the group with NCCL to run on GPUs, or give device='cpu'"
        )
    return device


def local_gpu() -> int:
    """This process's GPU: LOCAL_RANK, modulo the GPUs it can see."""
    count = max(torch.cuda.device_count(), 1)
    return int(os.environ.get("LOCAL_RANK", "0")) % count


def in_process_group() -> bool:
    """Whether this process belongs to an initialised default group of several processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_first_process() -> bool:
    """Process 0 of the default group, or a process that has none."""
    return not in_process_group() or dist.get_rank() == 0


@contextmanager
def process_group_from_environment(device: str | None, timeout_seconds: float) -> Iterator[str | None]:
    """For the CLI under torchrun (WORLD_SIZE > 1 in the environment): the default group for the
    duration, NCCL when this process runs on a GPU (its LOCAL_RANK one), else gloo; yields the
    process's device. Outside torchrun, or with a group already there, `device` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = check_device(device, check_index=False).type == "cuda"
    if on_gpu:  # each process its LOCAL_RANK GPU, whatever the index given
        device = f"cuda:{local_gpu()}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
    try:
        yield device
    finally:
        dist.destroy_process_group()
