"""The state a run carries from block to block: per task, its streams at the block boundary.

`TaskState` holds one task's student and expert hidden states (one tensor per batch this
process owns), the captured block arguments that replay a block on them, the token weights,
and the drift examples of the merged model as given. Other modules read its fields and change
them only through its methods. `RunState` owns every task's state and the streams' storage
(placement, temporary directory), and frees both when the run ends.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..io.offload import Stream
from ..io.stream_directory import make_stream_directory
from ..models.capture import BlockContext, same_context


@dataclass(frozen=True)
class BlockInputs:
    """What the accumulate phase reads for one task: per batch, the student and expert hidden
    states, their block arguments, and the token weights of the hidden states and of the
    encoder output (T5 cross-attention; None when every token weighs 1)."""

    student: Sequence[Tensor]
    expert: Sequence[Tensor]
    student_ctx: Sequence[BlockContext]
    expert_ctx: Sequence[BlockContext]
    weights: Sequence[Tensor | None]
    memory_weights: Sequence[Tensor | None]


class TaskState:
    """One task's streams at the current block boundary (see the module docstring)."""

    def __init__(self, run: RunState) -> None:
        self._run = run
        self.home = run.home  # where captured block arguments are kept
        self.student, self.expert = run.new_stream("student"), run.new_stream("expert")
        self.student_ctx: list[BlockContext] = []
        self.expert_ctx: list[BlockContext] = []
        self.weights: list[Tensor | None] = []
        self.memory_weights: list[Tensor | None] = []  # of the encoder output (T5 decoder)
        # The merged model's hidden states on the drift examples (the first of batch 0).
        self.drift: Tensor | None = None
        self.drift_ctx: BlockContext | None = None

    @property
    def tokens(self) -> int:
        """Tokens of the task's batches, padding included (picks the right-hand-side method)."""
        return sum(shape[0] * shape[1] for shape in self.student.shapes())

    def new_stream(self, kind: str) -> Stream:
        return self._run.new_stream(kind)

    def add_batch(
        self, hidden: Tensor, ctx: BlockContext, weights: Tensor | None, memory_weights: Tensor | None
    ) -> None:
        """Capture: a batch's student hidden states entering the stage, with its arguments."""
        self.student.append(hidden)
        self.student_ctx.append(self._kept(ctx))
        self.weights.append(weights)
        self.memory_weights.append(memory_weights)

    def add_expert_batch(self, hidden: Tensor, ctx: BlockContext) -> None:
        """Capture: the expert's hidden states of the next batch; its arguments share the
        student's copy when they are equal."""
        ctx = ctx.to(self.home)
        student = self.student_ctx[len(self.expert)]
        self.expert.append(hidden)
        self.expert_ctx.append(student if same_context(ctx, student) else self._kept(ctx))

    def _kept(self, ctx: BlockContext) -> BlockContext:
        """ctx as it is kept: at home, in pinned memory when a CPU home serves a GPU (its copies to
        the GPU at every block call are then asynchronous)."""
        pin = self.home.type == "cpu" and self._run.device.type == "cuda"
        return ctx.pinned() if pin else ctx.to(self.home)

    def inputs(self) -> BlockInputs:
        return BlockInputs(
            self.student, self.expert, self.student_ctx, self.expert_ctx, self.weights, self.memory_weights
        )

    def advance_student(self, outputs: Stream, contexts: list[BlockContext] | None = None) -> None:
        """The student stream moves to the next block boundary (and, after a stage's first block
        whose followers get computed arguments, their contexts). A failed write of `outputs` is
        raised here."""
        outputs.flush()
        self.student.close()
        self.student = outputs
        if contexts is not None:
            self.student_ctx = contexts

    def advance_expert(self, outputs: Stream, contexts: list[BlockContext] | None = None) -> None:
        """The expert stream moves to the next block boundary (see `advance_student`)."""
        outputs.flush()
        self.expert.close()
        self.expert = outputs
        if contexts is not None:
            self.expert_ctx = contexts

    def set_drift(self, hidden: Tensor | None, ctx: BlockContext | None) -> None:
        """The merged model's hidden states on the drift examples, and their block arguments."""
        self.drift, self.drift_ctx = hidden, ctx

    def close(self) -> None:
        self.student.close()
        self.expert.close()


class RunState:
    """Every task's state, and where their streams live ("device", "cpu" or "disk" placement,
    served on `device`; disk streams in a temporary directory under `offload_dir`)."""

    def __init__(self, placement: str, device: torch.device, offload_dir: str | None = None) -> None:
        self.placement, self.device = placement, device
        self.home = device if placement == "device" else torch.device("cpu")
        self.directory: Path | None = None
        if placement == "disk":
            self.directory = make_stream_directory(offload_dir)
        self._names = itertools.count()
        self.tasks: dict[str, TaskState] = {}

    def new_stream(self, kind: str) -> Stream:
        return Stream(self.placement, self.device, self.directory, name=f"{kind}-{next(self._names)}")

    def begin_stage(self, tasks: Sequence[str]) -> dict[str, TaskState]:
        """Fresh, empty task states for a stage's capture; the previous stage's stay readable
        until `end_stage`."""
        return {t: TaskState(self) for t in tasks}

    def end_stage(self, tasks: dict[str, TaskState]) -> None:
        """The new stage's states replace the previous stage's, which are freed."""
        for state in self.tasks.values():
            state.close()
        self.tasks = tasks

    def close(self) -> None:
        """Free every stream and remove the temporary directory. Idempotent."""
        for state in self.tasks.values():
            state.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
