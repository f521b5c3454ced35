"""The directory of a run's disk streams, and the removal of those that dead runs left behind.

A run's directory is `featcal-streams-<random>` under the offload directory (default: the
system's temporary directory) and holds `owner.json`: host name, process id and that process's
start time. A directory whose owner is a process of this host that no longer runs (or a newer
process with the same id) was left by a run that was killed (SIGKILL, a lost machine): the
next run that streams to disk under the same parent removes it. Directories of other hosts, of
live runs, or without a readable owner file are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..sizes import human
from .process_identity import ProcessIdentity

PREFIX = "featcal-streams-"
OWNER_FILE = "owner.json"

log = logging.getLogger("featcal")


def make_stream_directory(parent: str | os.PathLike | None) -> Path:
    """A fresh directory for this run's disk streams under `parent`, after removing stale ones."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    remove_stale(Path(parent) if parent is not None else Path(tempfile.gettempdir()))
    directory = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    (directory / OWNER_FILE).write_text(json.dumps(ProcessIdentity.current().to_dict()))
    return directory


def remove_stale(parent: Path) -> list[Path]:
    """Remove the stream directories under `parent` whose owner process is gone; their paths."""
    removed = []
    for directory in parent.glob(PREFIX + "*"):
        try:
            owner = ProcessIdentity.from_dict(json.loads((directory / OWNER_FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not owner.gone():
            continue
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        shutil.rmtree(directory, ignore_errors=True)
        log.warning(
            "removed the disk streams of a featcal run that was killed: %s (%s)", directory, human(size)
        )
        removed.append(directory)
    return removed
