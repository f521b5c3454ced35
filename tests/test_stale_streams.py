"""Disk streams left by a killed run are removed by the next run; others' are left alone."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

from featcal.io.stream_directory import OWNER_FILE, PREFIX, make_stream_directory, remove_stale


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fake_run(parent, name: str, owner: dict | None) -> None:
    directory = parent / f"{PREFIX}{name}"
    directory.mkdir()
    (directory / "student-0.000000.bin").write_bytes(b"x" * 4096)
    if owner is not None:
        (directory / OWNER_FILE).write_text(json.dumps(owner))


def test_a_killed_runs_streams_go_and_the_others_stay(tmp_path, caplog):
    mine = make_stream_directory(tmp_path)  # this live process
    owner = json.loads((mine / OWNER_FILE).read_text())
    _fake_run(tmp_path, "dead", {**owner, "pid": _dead_pid(), "started": 1})
    _fake_run(tmp_path, "reused", {**owner, "started": (owner["started"] or 0) + 1})  # same pid, other start
    _fake_run(tmp_path, "elsewhere", {**owner, "host": "another-host", "pid": _dead_pid()})
    _fake_run(tmp_path, "unowned", None)
    with caplog.at_level(logging.WARNING, logger="featcal"):
        second = make_stream_directory(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([mine.name, second.name, f"{PREFIX}elsewhere", f"{PREFIX}unowned"])
    assert (
        "removed the disk streams of a featcal run that was killed" in caplog.text
        and "4.0 KiB" in caplog.text
    )


def test_a_run_killed_by_sigkill_is_cleaned_up_by_the_next(tmp_path):
    code = (
        "import sys, time; from featcal.io.stream_directory import make_stream_directory; "
        "print(make_stream_directory(sys.argv[1]), flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    directory = child.stdout.readline().strip()
    assert os.path.isdir(directory)
    assert remove_stale(tmp_path) == []  # still running
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert [str(p) for p in remove_stale(tmp_path)] == [directory]
    assert not os.path.exists(directory)
