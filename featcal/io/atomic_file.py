"""Writing files so that readers see the old file or the complete new one, never a part, and the
new one survives a crash once it is in place: write to a temporary name, fsync, rename, fsync
the directory. A write that fails (a full disk, an I/O error) says which file, how many bytes it
needed, and how much room was left."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import FeatCalError
from ..sizes import human


@contextmanager
def atomic_file(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block succeeds it is synced and
    renamed to `path` (with the usual file mode under the umask), and the directory synced; on
    any failure it is removed and `path` is left untouched. `needed`: the bytes being written,
    for the message of a failed write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        # safetensors 0.8 creates files with mode 0600; give the usual mode under the umask instead.
        os.chmod(tmp, 0o666 & ~umask())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as err:
        raise write_error(path, needed, err) from err
    finally:
        tmp.unlink(missing_ok=True)


@functools.cache
def umask() -> int:
    """The process's umask (read once: reading it means setting it, which other threads would see)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries, to the disk (directories: POSIX only)."""
    if os.path.isdir(path) and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: str | os.PathLike, needed: int | None, err: OSError, hint: str = "") -> FeatCalError:
    """The error of a failed write of `path`: the file, the bytes needed, the room left there."""
    path = Path(path)
    size = "" if needed is None else f" ({human(needed)})"
    reason = os.strerror(err.errno) if err.errno else str(err)
    message = f"could not write {path}{size}: {reason}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = human(shutil.disk_usage(path.parent).free)
            message += f"; {path.parent} has {free} free"
        except OSError:
            pass
        message += ". Free some space there" + (f", or {hint}" if hint else "")
    return FeatCalError(message)
