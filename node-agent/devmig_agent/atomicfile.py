"""Crash-safe whole-file writes.

A reader sees either the old file or the new one, never a mix, and once
``write_atomic`` returns the new content survives a power cut: the data is
written to a temporary file in the same directory, fsynced, renamed over the
target (rename is atomic within a file system), and the directory is fsynced
so the rename itself is durable.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

# Temporary files start with this, so readers can skip leftovers of a write
# that was cut off before its rename.
TEMP_PREFIX = ".tmp-"


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    ``mode`` defaults to owner-only: these files name devices and sessions,
    which only the agent (root) needs to read.
    """
    p = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + p.name + ".", dir=p.parent)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, p)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(p.parent)
