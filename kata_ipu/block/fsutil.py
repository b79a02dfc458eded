"""Filesystem primitives: reflink clones (``FICLONE``), sparse copies, the immutable flag,
mount-table queries and space accounting."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import uuid
from pathlib import Path

FICLONE = 0x40049409
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS)


def reflink(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            mode: int = 0o600) -> None:
    """Create ``dst`` as a reflink clone of ``src`` (O_EXCL: never overwrites)."""
    s = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            fcntl.ioctl(d, FICLONE, s)
        except BaseException:
            os.close(d)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            raise
        os.close(d)
    finally:
        os.close(s)


def supports_reflink(directory: str | os.PathLike[str]) -> bool:
    """Probe: can files in ``directory`` be cloned with ``FICLONE``?"""
    probe = Path(directory) / f".reflink-probe-{uuid.uuid4().hex}"
    clone = probe.with_suffix(".clone")
    try:
        probe.write_bytes(b"x" * 4096)
        try:
            reflink(probe, clone)
        except OSError as exc:
            if exc.errno in _NO_REFLINK:
                return False
            raise
        return True
    finally:
        for p in (probe, clone):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def sparse_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Copy ``src`` to a new ``dst`` keeping holes (SEEK_DATA/SEEK_HOLE + copy_file_range).

    Copying data runs in large contiguous ranges, so the copy has few extents (reflink cost
    grows with the extent count). Returns the number of data bytes copied.
    """
    copied = 0
    s = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(s).st_size
        d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(d, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(s, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # only a hole remains
                    raise
                end = os.lseek(s, start, os.SEEK_HOLE)
                _copy_range(s, d, start, end)
                copied += end - start
                pos = end
            os.fsync(d)
        finally:
            os.close(d)
    finally:
        os.close(s)
    return copied


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    off = start
    while off < end:
        try:
            n = os.copy_file_range(src, dst, min(end - off, 1 << 30), off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break  # across filesystems: plain reads and writes
        if n == 0:
            return
        off += n
    while off < end:
        chunk = os.pread(src, min(end - off, 8 << 20), off)
        if not chunk:
            return
        os.pwrite(dst, chunk, off)
        off += len(chunk)


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of data ``path`` has (via SEEK_DATA/SEEK_HOLE), 0 if it is fully sparse."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        total, pos = 0, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
        return total
    finally:
        os.close(fd)


def set_immutable(path: str | os.PathLike[str], on: bool) -> bool:
    """Set or clear ``FS_IMMUTABLE_FL``; False if the filesystem does not support it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        flags = array.array("l", [0])
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
            new = flags[0] | FS_IMMUTABLE_FL if on else flags[0] & ~FS_IMMUTABLE_FL
            if new != flags[0]:
                flags[0] = new
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return True
    finally:
        os.close(fd)


def unlink_quiet(path: str | os.PathLike[str]) -> bool:
    """Remove ``path`` if present (clearing the immutable flag); True if something was removed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except PermissionError:
        set_immutable(path, False)
        os.unlink(path)
        return True


def statvfs_space(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(total, used, available) bytes of the filesystem holding ``path``."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize


