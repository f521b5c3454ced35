"""Errors raised for bad input, and where a message points. Each message names what is at fault
(task, block, module, shape)."""

from __future__ import annotations

from dataclasses import dataclass, replace


class FeatCalError(ValueError):
    """Bad input to featcal: the message says which task, block, module or file and why."""


class UnsupportedModelError(FeatCalError):
    """No model-family adapter knows this architecture."""


class NonFiniteError(FeatCalError):
    """NaN or Inf reached the statistics of a module."""


class DamagedOutputError(FeatCalError):
    """A partial output's files are missing or unreadable: it cannot be resumed."""


def add_note(err: BaseException, note: str) -> None:
    """Attach a line to an error, which the `featcal` command prints after its message
    (`BaseException.add_note`, which Python 3.10 lacks)."""
    err.__notes__ = [*getattr(err, "__notes__", []), note]


@dataclass(frozen=True)
class Location:
    """Where a message points: any of task, stage, block, module and batch.

    str() gives them in that order, e.g. "task 'math', t5-decoder block 1, module 'q', batch 2";
    `stage` (the stage's adapter name) is set only for models with more than one stage (T5: "t5"
    for the encoder, "t5-decoder").
    """

    task: str | None = None
    stage: str | None = None
    block: int | None = None
    module: str | None = None
    batch: int | None = None

    def at(self, **fields) -> Location:
        """This location with some fields replaced."""
        return replace(self, **fields)

    def __str__(self) -> str:
        parts = []
        if self.task is not None:
            parts.append(f"task {self.task!r}")
        if self.block is not None:
            parts.append(f"{self.stage} block {self.block}" if self.stage else f"block {self.block}")
        elif self.stage:
            parts.append(f"{self.stage} stage")
        if self.module is not None:
            parts.append(f"module {self.module!r}")
        if self.batch is not None:
            parts.append(f"batch {self.batch}")
        return ", ".join(parts)
