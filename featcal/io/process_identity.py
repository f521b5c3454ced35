"""Which process made a file, and whether it still runs: host name, process id and start time.

The start time (clock ticks since boot, /proc/PID/stat field 22) tells a live owner from a
newer process that reuses its id. Directories that a run owns (disk streams, the partial
output) record `ProcessIdentity.current()`; a later run removes stale disk streams whose owner
is `gone()` and leaves alone a partial output whose owner is `running()`. Neither can be told
of a process of another host.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    started: int | None  # None where the process does not exist; -1 where the platform cannot say

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        return cls(socket.gethostname(), pid, _start_time(pid))

    @classmethod
    def current(cls) -> ProcessIdentity:
        return cls.of(os.getpid())

    @classmethod
    def from_dict(cls, data: dict) -> ProcessIdentity:
        """From `to_dict()`; ValueError, KeyError or TypeError for anything else."""
        started = data["started"]
        return cls(str(data["host"]), int(data["pid"]), None if started is None else int(started))

    def to_dict(self) -> dict:
        return asdict(self)

    def gone(self) -> bool:
        """True when this is a process of this host that no longer runs (its id is free, or taken
        by a newer process); False for a live one, or one of another host (which cannot be told)."""
        if self.host != socket.gethostname():
            return False
        return ProcessIdentity.of(self.pid).started != self.started

    def running(self) -> bool:
        """True when this is a live process of this host."""
        return self.host == socket.gethostname() and not self.gone()

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat, counted after the command name
    except (OSError, IndexError, ValueError):
        # Without /proc a live process's start is unknown (-1): it is never taken for gone.
        return -1 if not os.path.isdir("/proc") and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
