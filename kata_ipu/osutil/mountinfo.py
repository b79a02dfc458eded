"""Mount-table queries from ``/proc/self/mountinfo`` (the calling process's mount namespace).

:func:`mount_source` (what is mounted at a path), :func:`mounts_under` (every mount point at or
below a path, deepest first: the order to unmount them in) and :func:`device_is_mounted` (a
block device by ``major:minor``). Mount points are unescaped as the kernel escapes them
(``\\040`` space, ``\\011`` tab, ``\\012`` newline, ``\\134`` backslash). Each call reads the
table afresh; nothing is cached. ``table`` is for tests (a saved mountinfo).
"""

from __future__ import annotations

import os

MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def mount_source(mountpoint: str | os.PathLike[str], *,
                 table: str = MOUNTINFO) -> tuple[str, str] | None:
    """(source, fstype) of the mount at ``mountpoint`` (the topmost when stacked), or None
    if nothing is mounted there."""
    want = os.path.realpath(mountpoint)
    found = None
    with open(table) as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == want:
                sep = fields.index("-")
                found = (_unescape(fields[sep + 2]), fields[sep + 1])
    return found


def mounts_under(prefix: str | os.PathLike[str], *, table: str = MOUNTINFO) -> list[str]:
    """Mount points at or below ``prefix`` (deepest first)."""
    root = os.path.realpath(prefix)
    out = []
    with open(table) as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def device_is_mounted(major: int, minor: int, *, table: str = MOUNTINFO) -> bool:
    """Whether block device ``major:minor`` is mounted anywhere."""
    want = f"{major}:{minor}"
    with open(table) as f:
        return any(line.split(" ", 3)[2] == want for line in f)
