"""SIGTERM and SIGINT as a clean stop of the `featcal` command.

Under `stop_on_signals`, either signal raises `Stopped` (a KeyboardInterrupt, so no `except
Exception` swallows it) where the run is: every `finally` on the way out runs, so the output's
temporary directory and the disk streams are removed. The command then prints one line and
exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as shells expect.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` for the duration (main thread only); the previous
    handlers come back after."""

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
