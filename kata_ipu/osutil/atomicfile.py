"""Replace a file atomically: a reader sees the old content or the new, never a torn one.

:func:`write_atomic` writes a temporary file beside ``path`` (a dot file named after it, the
pid and the thread, so concurrent writers never share one) and ``rename(2)``\\ s it over
``path``. With ``durable=True`` the data is fsynced before the rename and the directory
after it, so the new content also survives a host crash; without, it survives the process
only (for records in a tmpfs, or ones a recovery rebuilds). :func:`fsync_dir` makes a rename
or unlink in a directory durable.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` (its entries: renames, creations, unlinks)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary file :func:`write_atomic` uses for ``path`` in this thread."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace ``path`` by a file holding ``data`` (see the module docstring)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
