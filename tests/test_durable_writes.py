"""Files are synced before they are renamed into place, and a full disk gives a clear error."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import featcal.io.atomic_file as atomic
import featcal.io.offload as offload
from featcal.errors import FeatCalError
from featcal.io.atomic_file import atomic_file
from featcal.io.checkpoint import atomic_directory
from featcal.io.offload import Stream


def _record_fsyncs(monkeypatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names of open files from /proc")
def test_atomic_file_syncs_the_file_then_its_directory(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names of open files from /proc")
def test_atomic_directory_syncs_every_file_before_the_rename(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    with atomic_directory(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"12")
        (tmp / "y.json").write_text("{}")
    names = [os.path.basename(p) for p in synced]
    assert {"x.bin", "y.json", "sub"} <= set(names)
    assert names.index("x.bin") < names.index("sub")  # a file before the directory holding it
    assert synced[-1] == str(tmp_path)  # the rename itself
    assert (tmp_path / "out" / "sub" / "x.bin").read_bytes() == b"12"


def test_a_full_disk_while_writing_a_file_names_it_and_leaves_nothing(tmp_path):
    with pytest.raises(
        FeatCalError, match=r"could not write .*report\.json \(1\.0 KiB\): No space left on device"
    ):
        with atomic_file(tmp_path / "report.json", needed=1024) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_a_stream_names_the_file_and_the_room(tmp_path, monkeypatch):
    class FullDisk:
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    stream = Stream("disk", "cpu", tmp_path, name="student-3")
    stream.append(torch.randn(2, 3, 4))
    stream.flush()
    monkeypatch.setattr(offload, "open", FullDisk, raising=False)
    message = r"could not write .*student-3\.000001\.bin \(96 B\): No space left on device; .* free\. "
    stream.append(torch.randn(2, 3, 4))  # written by the stream's writer thread
    with pytest.raises(FeatCalError, match=message + "Free some space there, or give another --offload-dir"):
        stream.flush()
    with pytest.raises(FeatCalError, match=message):
        stream.append(torch.randn(2, 3, 4))  # the failure is raised again, nothing more is written
    with pytest.raises(FeatCalError, match=message):
        stream[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student-3.000000.bin"]


def test_other_write_errors_keep_their_reason(tmp_path):
    with pytest.raises(FeatCalError, match=r"could not write .*x\.bin: Input/output error$"):
        with atomic_file(tmp_path / "x.bin"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
