"""What a calibration run reports: feature drift per block before and after, time, peak memory.

The drift of a block for task t is ||S_t - E_t|| / ||E_t|| over the (non-padding) tokens of
its output, S_t the student's and E_t expert t's hidden states; a block's value is the mean
over tasks. `drift_merged` is the merged model as given, `drift_calibrated` after FeatCal.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.atomic_file import atomic_file


@dataclass
class StepReport:
    """One step of a block (one with sequential="off"): the modules it solved and its seconds
    (accumulate to solve; the first step's include the groups' discovery and the merged drift)."""

    modules: list[str]
    seconds: float


@dataclass
class BlockReport:
    index: int
    seconds: float
    stage: str | None = None
    drift_merged: float | None = None
    drift_calibrated: float | None = None
    drift_merged_per_task: dict[str, float] = field(default_factory=dict)
    drift_calibrated_per_task: dict[str, float] = field(default_factory=dict)
    steps: list[StepReport] = field(default_factory=list)
    # Routed MoE experts that kept their merged weights (fewer tokens than min_expert_tokens):
    # module name -> the calibration tokens routed to it, over all tasks.
    low_coverage_experts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> BlockReport:
        """The report of `asdict(report)` (as a partial output's manifest keeps it)."""
        steps = [StepReport(**step) for step in data.get("steps", [])]
        return cls(**{**data, "steps": steps})


@dataclass
class DistributedReport:
    """A run spread over processes: per rank its tasks, batches, tokens (padding included: the
    work they weigh), seconds spent in collectives (waiting for the others included) and memory
    plan."""

    world_size: int
    backend: str | None
    ranks: list[dict]


IN_MEMORY_MODULE = "in-memory module"
IN_MEMORY_DATA = "in memory"


@dataclass
class TaskData:
    """Where a task's calibration data came from: its data file (an absolute path) or
    "in memory" (batches given to `calibrate`), and its number of examples."""

    source: str
    examples: int


@dataclass
class InputsReport:
    """Where every input of a run came from. A model is an absolute checkpoint path, a hub id, or
    "in-memory module"; `data` is per task; and the featcal and torch versions that ran."""

    merged: str
    base: str
    experts: dict[str, str]
    data: dict[str, TaskData]
    featcal_version: str
    torch_version: str

    @classmethod
    def from_dict(cls, data: dict) -> InputsReport:
        return cls(**{**data, "data": {t: TaskData(**d) for t, d in data["data"].items()}})


@dataclass
class CalibrationReport:
    """A run's report. `tasks`: per task its `batches`, its `tokens` (the non-padding tokens of
    its batches, those the statistics count; T5: the encoder's) and `padding_tokens`."""

    blocks: list[BlockReport]
    tasks: dict[str, dict[str, int]]
    wall_seconds: float
    device: str
    peak_cpu_rss_bytes: int | None
    peak_cuda_bytes: int | None
    config: dict
    backend: dict
    memory_plan: dict | None = None
    warnings: list[str] = field(default_factory=list)
    distributed: DistributedReport | None = None
    # A resumed run: the first block it calibrated (stage name, index; None when the earlier
    # run had finished them all), the blocks it kept, and the seconds of their replay.
    resumed_from: dict | None = None
    snapshot_seconds: float = 0.0  # spent writing stream snapshots into the partial output
    inputs: InputsReport | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationReport:
        """The report of `to_dict()` (as featcal_report.json holds it)."""
        typed = dict(data, blocks=[BlockReport.from_dict(b) for b in data["blocks"]])
        if data.get("distributed") is not None:
            typed["distributed"] = DistributedReport(**data["distributed"])
        if data.get("inputs") is not None:
            typed["inputs"] = InputsReport.from_dict(data["inputs"])
        return cls(**typed)

    def write_json(self, path: str | Path) -> None:
        """Write the report as JSON, under a temporary name first so no partial file is left."""
        write_json_atomic(path, self.to_dict())

    def summary(self) -> str:
        """A short human-readable table: drift per block, then time and memory."""
        lines = ["block  drift merged  drift calibrated"]
        for b in self.blocks:
            lines.append(f"{b.index:5d}  {_fmt(b.drift_merged):>12}  {_fmt(b.drift_calibrated):>16}")
        tokens = sum(t["tokens"] for t in self.tasks.values())
        padding = sum(t.get("padding_tokens", 0) for t in self.tasks.values())
        lines.append(
            f"{len(self.tasks)} tasks, {tokens} tokens ({padding} padding), {len(self.blocks)} blocks "
            f"on {self.device} in {self.wall_seconds:.1f} s"
        )
        sequential = self.config.get("sequential", "off")
        if sequential != "off" and self.blocks:
            counts = sorted({len(b.steps) for b in self.blocks})
            steps = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
            later = sum(s.seconds for b in self.blocks for s in b.steps[1:])
            lines.append(
                f"sequential statistics by {sequential}: {steps} steps per block, "
                f"{later:.1f} s in the steps after each block's first"
            )
        low = [(b, name, n) for b in self.blocks for name, n in b.low_coverage_experts.items()]
        if low:
            shown = ", ".join(f"block {b.index} {name} ({n})" for b, name, n in low[:4])
            more = f" and {len(low) - 4} more" if len(low) > 4 else ""
            minimum = self.config.get("min_expert_tokens")
            lines.append(
                f"{len(low)} routed expert maps kept their merged weights, reached by fewer than "
                f"{minimum} tokens: {shown}{more}"
            )
        if self.resumed_from is not None:
            r = self.resumed_from
            restored = r.get("restored_from_snapshot", 0)
            lines.append(
                f"resumed with {r['finished_before']} finished blocks kept ({restored} from a stream "
                f"snapshot, the others replayed in {r['replay_seconds']:.1f} s)"
            )
        if self.distributed is not None:
            d = self.distributed
            waited = max(r["communication_seconds"] for r in d.ranks)
            lines.append(
                f"over {d.world_size} processes ({d.backend}), at most {waited:.1f} s in collectives"
            )
        memory = []
        if self.peak_cpu_rss_bytes is not None:
            memory.append(f"peak RSS {self.peak_cpu_rss_bytes / 2**30:.2f} GiB")
        if self.peak_cuda_bytes is not None:
            memory.append(f"peak GPU memory {self.peak_cuda_bytes / 2**30:.2f} GiB")
        if self.memory_plan:
            memory.append(f"streams on {self.memory_plan['placement']}")
        if memory:
            lines.append(", ".join(memory))
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def peak_cpu_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (None where the platform cannot say).

    On Linux this is VmHWM, which starts afresh with the program; `ru_maxrss` would carry the peak
    of a parent process across fork and exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_json_atomic(path: str | Path, data) -> None:
    """json.dump to a temporary file beside `path`, then rename it over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
