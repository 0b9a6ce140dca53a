"""The one whole-file writer: every file the project writes on a local disk goes through here.

A file is written under a ``_``-prefixed temporary name in its final folder, fsynced, then renamed
into place with ``os.replace``. A process killed mid-write leaves only the temporary name, which no
reader looks at (readers skip ``_`` names), so a reader sees the old file or the new one, never a
part. :class:`pipeline.store.objects.Store` uses it for local folders; object stores get one whole PUT.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask is process-wide, never toggle it while threads write


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` as the whole of ``path`` (folders made as needed), atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="_", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a results file reads like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_dir(path.parent)  # the rename itself is durable only once the folder's entry is
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename or link into it survives a crash (POSIX; a no-op where
    folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_atomic(path: str | Path, data: bytes) -> bool:
    """Write ``data`` as ``path`` only if no file is there (compare-and-set); returns whether it did.

    The whole file is written under a temporary name first, then hard-linked into place: ``link``
    fails when the name exists, so of two writers racing for one name exactly one wins, and a
    reader never sees a part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="_", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _sync_dir(path.parent)
        return True
    finally:
        os.unlink(tmp)
