"""Snapshots of the streams at a block boundary, kept in the partial output, so that a resumed
run replays only the blocks finished after the latest one (docs/algorithm.md s.11).

A snapshot is the directory `featcal-snapshot-<n>` (n: the blocks finished when it was taken)
holding, per task (by its place in the task order) and batch, the student and expert hidden states,
and the merged model's hidden states on the drift examples: `<task>.student.<batch>`, ... one
safetensors file each, so that no more than a batch is ever in memory. It is written under a
temporary name, synced and renamed whole; the manifest then names it, and the previous one goes.

Snapshots cost writes, so `SnapshotPolicy` takes one only when the time since the last one is
at least `1 / budget` times what the last one took (5%: at most a twentieth of the run is spent
on them). They are taken for models of one stage whose blocks all get the arguments captured
before block 0, in a single process: there a snapshot holds all the state of the streams. T5
(whose decoder needs the encoder's streams, and whose block 0 computes its followers'
arguments) and runs over several processes (each holds other batches) replay from block 0.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import FeatCalError
from ..io.checkpoint import install_directory
from ..io.sharded_writer import save_tensors
from .state import RunState

BUDGET = 0.05


@dataclass
class SnapshotPolicy:
    """When to take the next snapshot (see the module docstring)."""

    budget: float = BUDGET
    last_cost: float | None = None  # seconds the last snapshot took
    since: float = field(default_factory=time.perf_counter)  # when it ended
    seconds: float = 0.0  # all snapshots of the run

    def due(self) -> bool:
        if self.last_cost is None:
            return True
        return (time.perf_counter() - self.since) * self.budget >= self.last_cost

    def taken(self, seconds: float) -> None:
        self.last_cost, self.since = seconds, time.perf_counter()
        self.seconds += seconds


def snapshot_name(finished: int) -> str:
    return f"featcal-snapshot-{finished:05d}"


def write_snapshot(partial: Path, finished: int, state: RunState) -> str:
    """The streams of every task in `state` as snapshot `finished` under `partial`; its name."""
    name = snapshot_name(finished)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=partial))
    try:
        for number, task in enumerate(state.tasks.values()):
            for kind, stream in (("student", task.student), ("expert", task.expert)):
                for i, hidden in enumerate(stream):
                    save_tensors(tmp / f"{number}.{kind}.{i}.safetensors", {"hidden": hidden}, {})
            if task.drift is not None:
                save_tensors(tmp / f"{number}.drift.safetensors", {"hidden": task.drift}, {})
        install_directory(tmp, partial / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return name


def read_snapshot(directory: Path, state: RunState) -> None:
    """Replace the streams of every task in `state` (just captured: their contexts and token
    weights are the ones the snapshot's streams go with) by the snapshot's."""
    for number, task in enumerate(state.tasks.values()):
        student, expert = task.new_stream("student"), task.new_stream("expert")
        for kind, stream, now in (("student", student, task.student), ("expert", expert, task.expert)):
            for i, shape in enumerate(now.shapes()):
                hidden = _read(directory / f"{number}.{kind}.{i}.safetensors")
                if tuple(hidden.shape) != tuple(shape):
                    raise _damaged(
                        directory, f"batch {i} has shape {tuple(hidden.shape)}, not {tuple(shape)}"
                    )
                stream.append(hidden)
        task.advance_student(student)
        task.advance_expert(expert)
        if task.drift is not None:
            task.set_drift(
                _read(directory / f"{number}.drift.safetensors").to(task.drift.device), task.drift_ctx
            )


def _read(file: Path):
    """A snapshot file's tensor, read into memory (not a mapping of a file that may be removed)."""
    try:
        return load_file(file)["hidden"].clone()
    except (OSError, KeyError, SafetensorError) as err:
        raise _damaged(file.parent, f"{file.name}: {err}") from err


def _damaged(directory: Path, why: str) -> FeatCalError:
    return FeatCalError(f"the stream snapshot {directory} of the partial output cannot be read ({why})")
