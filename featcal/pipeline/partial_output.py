"""The partial output of a run writing to OUT: the directory `OUT.featcal-partial` beside it.

It holds the calibrated blocks finished so far (the output checkpoint's shards, or for an
in-memory model one file per block) and `featcal_manifest.json` (`Manifest`): the featcal
version, the settings that change results, the tasks, the fingerprint of the data and of every
model, the blocks per stage, the process writing it, and the reports of the finished blocks.
A block counts as finished only once its file is durable (temporary name, fsync, rename,
directory fsync) and the manifest then replaced the same way. When the run completes the
manifest goes and the directory is renamed to OUT.

`inspect` says, before any work, what an existing partial output means for a new run (and
refuses what may not be done); `PartialOutput.start` creates the directory or takes it over.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import FeatCalConfig
from ..errors import FeatCalError
from ..io.atomic_file import atomic_file, fsync_path
from ..io.checkpoint import check_output, rename_directory, sync_tree
from ..io.process_identity import ProcessIdentity
from .fingerprint import first_difference

SUFFIX = ".featcal-partial"
MANIFEST_FILE = "featcal_manifest.json"
SCRATCH = "featcal-"  # directories kept only for a resume (stream snapshot, block files)
FORMAT = 1

log = logging.getLogger("featcal")


def partial_path(out: str | Path) -> Path:
    """Where the partial output of a run writing to `out` lives."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


@dataclass
class Manifest:
    """What a partial output says about the run that wrote it (see the module docstring)."""

    featcal_version: str
    settings: dict  # FeatCalConfig fields that change results
    tasks: list[str]
    inputs: dict[str, str]  # `input_fingerprint`: part -> digest
    blocks_per_stage: list[int]
    owner: dict = field(default_factory=lambda: ProcessIdentity.current().to_dict())
    finished: list[dict] = field(default_factory=list)  # BlockReport dicts, in forward order
    last_finished: str | None = None  # e.g. "t5-decoder block 2"
    snapshot: str | None = None  # the directory of the latest stream snapshot (stream_snapshot.py)
    snapshot_finished: int = 0  # the blocks finished when it was taken
    numerics: dict = field(default_factory=dict)  # device, torch version, backends: for bit-identity
    format: int = FORMAT

    @property
    def total(self) -> int:
        return sum(self.blocks_per_stage)

    def progress(self) -> str:
        """e.g. "7 of 12 blocks finished, up to block 6"."""
        return f"{len(self.finished)} of {self.total} blocks finished, up to {self.last_finished}"

    def mismatch(self, now: Manifest) -> str | None:
        """How the run `now` differs from the one that wrote this manifest (None: it may resume)."""
        if self.featcal_version != now.featcal_version:
            return f"it was written by featcal {self.featcal_version}, this is featcal {now.featcal_version}"
        defaults = FeatCalConfig().to_dict()  # a setting added since: its default keeps old results
        settings = FeatCalConfig.upgrade(self.settings)
        for key in sorted(set(settings) | set(now.settings)):
            before, after = settings.get(key, defaults.get(key)), now.settings.get(key)
            if before != after:
                return f"its run had {key}={before!r}, this one has {key}={after!r}"
        if self.tasks != now.tasks:
            return f"its run had the tasks {', '.join(self.tasks)}; this one has {', '.join(now.tasks)}"
        part = first_difference(self.inputs, now.inputs)
        if part is not None:
            return f"this run's {part} is not the one its run was given"
        return None

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """The manifest of a partial output; a FeatCalError saying why it cannot be read."""
        file = directory / MANIFEST_FILE
        try:
            data = json.loads(file.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this featcal reads format {FORMAT}")
            return cls(**data)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise FeatCalError(f"{directory} is not a resumable partial output ({file.name}: {err})") from err

    def write(self, directory: Path) -> None:
        with atomic_file(directory / MANIFEST_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")


def inspect(out: str | Path, overwrite: bool, resume: bool) -> Manifest | None:
    """Before any work: refuse what a run writing to `out` may not do; the manifest of the partial
    output to resume from, or None (the run starts afresh, and `start` discards what is there)."""
    if resume and overwrite:
        raise FeatCalError("--resume keeps the partial output and --overwrite discards it: give one of them")
    path = partial_path(out)
    manifest, unreadable = None, None
    if path.exists():
        try:
            manifest = Manifest.read(path)
        except FeatCalError as err:
            unreadable = err
    # A run begun with --overwrite over an existing `out` is resumed with --resume alone.
    check_output(out, overwrite or (resume and manifest is not None and bool(manifest.finished)))
    if manifest is None:
        if unreadable is not None and not overwrite:
            raise FeatCalError(f"{unreadable}: pass --overwrite to discard it") from unreadable
        return None
    owner = _owner(manifest)
    if owner is not None and owner != ProcessIdentity.current() and owner.running():
        raise FeatCalError(
            f"{path} is being written by a featcal run that is still going ({owner}); wait for it to "
            "end or stop it first"
        )
    if overwrite or not manifest.finished:
        return None
    if resume:
        return manifest
    raise FeatCalError(
        f"{path} holds an interrupted run of this output ({manifest.progress()}): run the same command "
        "with --resume to go on from there, or with --overwrite to discard it and start over"
    )


def _remove_leftovers(path: Path, snapshot: str | None) -> None:
    """Remove the temporary files and directories that a kill left in a partial output, and any
    stream snapshot but the manifest's."""
    for leftover in [*path.rglob(".*.tmp"), *path.glob(f"{SCRATCH}snapshot-*")]:
        if leftover.name == snapshot:
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)  # gone with a directory removed before it


def _warn_if_elsewhere(path: Path, previous: Manifest, now: Manifest) -> None:
    """A partial output of another host (whose run this one cannot see), or of other numerics
    (devices, torch, backends round otherwise: the result is not bit-identical): said, not refused."""
    owner = _owner(previous)
    if owner is not None and owner.host != now.owner.get("host"):
        log.warning(
            "%s was written by %s: make sure that run has stopped (this machine cannot tell)", path, owner
        )
    for key in sorted(set(previous.numerics) | set(now.numerics)):
        if previous.numerics.get(key) != now.numerics.get(key):
            log.warning(
                "resuming %s with %s %r where its run had %r: the result is close to, but not "
                "bit-identical with, an uninterrupted run's",
                path,
                key,
                now.numerics.get(key),
                previous.numerics.get(key),
            )


def _owner(manifest: Manifest) -> ProcessIdentity | None:
    try:
        return ProcessIdentity.from_dict(manifest.owner)
    except (ValueError, KeyError, TypeError):
        return None


class PartialOutput:
    """A run's partial output directory (`path`) and its manifest."""

    def __init__(self, out: Path, manifest: Manifest) -> None:
        self.out, self.path, self.manifest = Path(out), partial_path(out), manifest

    @classmethod
    def start(cls, out: str | Path, manifest: Manifest, previous: Manifest | None) -> PartialOutput:
        """Take over the partial output of `previous` (the manifest `inspect` returned; refused
        unless `manifest`, the new run's, matches it), or begin an empty one."""
        partial = cls(Path(out), manifest)
        path = partial.path
        if previous is not None:
            why = previous.mismatch(manifest)
            if why is not None:
                raise FeatCalError(
                    f"cannot resume from {path}: {why}; pass --overwrite instead of --resume to discard it "
                    "and start over"
                )
            _remove_leftovers(path, previous.snapshot)
            for name in ("finished", "last_finished", "snapshot", "snapshot_finished"):
                setattr(manifest, name, getattr(previous, name))
            _warn_if_elsewhere(path, previous, manifest)
            manifest.write(path)
            return partial
        if path.exists():
            if path.is_dir() and (path / MANIFEST_FILE).exists():
                log.warning("discarded the partial output %s of an earlier run", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        manifest.write(tmp)
        tmp.rename(path)  # the directory appears with its manifest
        fsync_path(path.parent)
        return partial

    @property
    def finished(self) -> int:
        return len(self.manifest.finished)

    def record(self, report: dict, where: str, snapshot: str | None = None) -> None:
        """A block is finished: its file (and a new stream `snapshot` taken after it) is durable;
        the manifest now says so, and the previous snapshot goes."""
        manifest, old = self.manifest, self.manifest.snapshot
        manifest.finished.append(report)
        manifest.last_finished = where
        if snapshot is not None:
            manifest.snapshot, manifest.snapshot_finished = snapshot, len(manifest.finished)
        manifest.write(self.path)
        if snapshot is not None and old is not None:
            shutil.rmtree(self.path / old, ignore_errors=True)

    def complete(self) -> None:
        """The output is whole: synced, its manifest removed, renamed to `out`; then what was
        kept only for a resume (the directories named featcal-*: snapshot, block files) goes."""
        sync_tree(self.path)
        (self.path / MANIFEST_FILE).unlink()
        fsync_path(self.path)
        rename_directory(self.path, self.out)
        for scratch in self.out.glob(f"{SCRATCH}*"):
            shutil.rmtree(scratch, ignore_errors=True)
        fsync_path(self.out)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def note(self) -> str:
        """What a user reads after an interrupted run: where the finished blocks are, how to go on."""
        return (
            f"the partial output {self.path} keeps the finished blocks ({self.manifest.progress()}): run "
            "the same command with --resume (without --overwrite) to go on from there"
        )
