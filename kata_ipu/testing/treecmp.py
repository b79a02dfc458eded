"""Snapshot a directory tree entry by entry and diff two snapshots (the umoci oracle tests).

Each entry records type, mode (permission bits incl. setuid/setgid/sticky), uid, gid, size,
sha256 of the content, symlink target, rdev, xattrs, and a hardlink group key so that "these
names are one inode" is compared too. mtimes are left out (the issue's comparison list does not
include them, and implicit parent directories get the build time).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str
    link: str
    rdev: tuple[int, int]
    xattrs: tuple[tuple[str, bytes], ...]
    nlink: int


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        if n == "security.selinux":
            continue
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def snapshot(root: str | os.PathLike[str], *, ignore: tuple[str, ...] = ()) -> dict[str, Entry]:
    """Map of relative path ("." for the root) to :class:`Entry`."""
    root = os.fspath(root)
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames
                       if os.path.normpath(os.path.join(rel_dir, d)) not in ignore]
        names = [(".", dirpath)] if rel_dir == "." else []
        for n in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, n))
            if rel not in ignore:
                names.append((rel, os.path.join(dirpath, n)))
        for rel, path in names:
            st = os.lstat(path)
            digest, link = "", ""
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                digest = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                link = os.readlink(path)
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) \
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else (0, 0)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            out[rel] = Entry(_kind(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                             size, digest, link, rdev, _xattrs(path),
                             st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0)
    return out


def diff(left: dict[str, Entry], right: dict[str, Entry], *,
         skip_root_meta: bool = False) -> list[str]:
    """Human-readable differences (empty list when the trees are equal)."""
    problems = []
    for path in sorted(set(left) | set(right)):
        a, b = left.get(path), right.get(path)
        if a is None:
            problems.append(f"{path}: only on the right ({b})")
        elif b is None:
            problems.append(f"{path}: only on the left ({a})")
        elif a != b and not (skip_root_meta and path == "."):
            fields = [f for f in Entry.__dataclass_fields__ if getattr(a, f) != getattr(b, f)]
            detail = ", ".join(f"{f}: {getattr(a, f)!r} != {getattr(b, f)!r}" for f in fields)
            problems.append(f"{path}: {detail}")
    return problems
