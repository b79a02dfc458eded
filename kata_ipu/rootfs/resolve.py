"""Containment: turn a layer path into (parent dir fd, final name) inside the image root.

Everything is done relative to directory file descriptors with ``O_NOFOLLOW``; no host path
string is ever joined and handed to the kernel. Symlinks met *in parent position* are followed
the way the container will see them: absolute targets restart at the image root and ``..``
stops at the root (securejoin / ``openat2(RESOLVE_IN_ROOT)`` semantics, as umoci does). This
matters for real images: Debian's ``/var/run -> /run`` is absolute, ``/bin -> usr/bin`` is
relative, and later layers write through both. The *final* component is never followed.

Entry names themselves are stricter than symlink targets: a name with a ``..`` component, a NUL
byte, or longer than PATH_MAX is refused with :class:`PathEscape` (no legitimate layer writer
produces one, and accepting them is how host files get overwritten).
"""

from __future__ import annotations

import collections
import errno
import os
import stat
from dataclasses import dataclass

from kata_ipu.rootfs.errors import BadLayer, PathEscape

PATH_MAX = 4096
NAME_MAX = 255
MAXSYMLINKS = 40

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_entry_name(name: str) -> tuple[str, ...]:
    """Components of a tar entry name, relative to the root; refuses escapes."""
    if "\x00" in name:
        raise PathEscape(name, "name contains a NUL byte")
    if len(name.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise PathEscape(name[:64] + "...", f"name is longer than PATH_MAX ({PATH_MAX})")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    for p in parts:
        if p == "..":
            raise PathEscape(name, "'..' component")
        if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise PathEscape(name[:64] + "...", f"component longer than NAME_MAX ({NAME_MAX})")
    return parts


@dataclass(slots=True)
class _Walk:
    """One walk in progress: the path asked for, and what is left of it."""

    parts: tuple[str, ...]
    create: bool
    stack: list[tuple[int, str]]  # (fd, name) from the root down; fds other than the root's
    pending: list[str]
    links: int = 0


class Root:
    """An open image root plus a small cache of resolved parent directories.

    The cache maps a lexical parent path to (fd, canonical path). It is dropped whenever the
    applier removes or replaces anything, because that is the only way a cached resolution can
    become stale (the tree has one writer: us).
    """

    CACHE = 64

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache: collections.OrderedDict[tuple[str, ...], tuple[int, tuple[str, ...]]] = (
            collections.OrderedDict())
        self._graveyard: list[int] = []
        self._stale = False

    def close(self) -> None:
        self._stale = True
        self.begin_entry()
        os.close(self.fd)

    def invalidate_after_entry(self) -> None:
        """Something was removed: drop the cache, but only once the current entry is done
        (its borrowed fds must stay valid until then)."""
        self._stale = True

    def begin_entry(self) -> None:
        if self._stale:
            for fd, _ in self._cache.values():
                self._graveyard.append(fd)
            self._cache.clear()
            self._stale = False
        for fd in self._graveyard:
            os.close(fd)
        self._graveyard.clear()

    def parent(self, parts: tuple[str, ...], *, create: bool) -> tuple[int, tuple[str, ...]] | None:
        """(borrowed fd, canonical path) of the directory ``parts``; ``None`` if it does not
        exist and ``create`` is false. The fd stays owned by the cache: do not close it."""
        if not parts:
            return self.fd, ()
        hit = self._cache.get(parts)
        if hit is not None:
            self._cache.move_to_end(parts)
            return hit
        found = self._walk(parts, create=create)
        if found is None or found[0] == self.fd:
            return found
        self._cache[parts] = found
        if len(self._cache) > self.CACHE:
            _, (old_fd, _) = self._cache.popitem(last=False)
            self._graveyard.append(old_fd)  # may be borrowed by the current entry
        return found

    def _walk(self, parts: tuple[str, ...], *, create: bool) -> tuple[int, tuple[str, ...]] | None:
        # Stack of (fd, name) from the root down; fds other than the root's are ours.
        walk = _Walk(parts, create, [], list(parts))
        stack = walk.stack
        try:
            while walk.pending:
                comp = walk.pending.pop(0)
                cur = stack[-1][0] if stack else self.fd
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if stack:
                        os.close(stack.pop()[0])
                    continue
                st = self._lstat(walk, comp, cur)
                if st is None:
                    return None
                if stat.S_ISLNK(st.st_mode):
                    if not self._follow(walk, comp, cur):
                        return None
                    continue
                fd = self._descend(walk, comp, cur, st)
                if fd is None:
                    return None
                stack.append((fd, comp))
            if not stack:
                return self.fd, ()
            # Keep only the last fd; the canonical path is the names on the stack.
            top = stack.pop()
            for fd, _ in stack:
                os.close(fd)
            canon = (*tuple(n for _, n in stack), top[1])
            stack.clear()
            return top[0], canon
        finally:
            for fd, _ in stack:
                os.close(fd)

    @staticmethod
    def _lstat(walk: _Walk, comp: str, cur: int) -> os.stat_result | None:
        """The component's own metadata; a missing one is made (implicit parent) when
        creating, else None."""
        try:
            return os.stat(comp, dir_fd=cur, follow_symlinks=False)
        except FileNotFoundError:
            if not walk.create:
                return None
            # Implicit parent: tar lets an entry appear before its directory.
            os.mkdir(comp, 0o755, dir_fd=cur)
            return os.stat(comp, dir_fd=cur, follow_symlinks=False)

    @staticmethod
    def _follow(walk: _Walk, comp: str, cur: int) -> bool:
        """Queue a symlink's target in place of the link; False: a lookup finds nothing."""
        walk.links += 1
        if walk.links > MAXSYMLINKS:
            if not walk.create:
                return False  # a lookup through a symlink loop finds nothing
            raise PathEscape("/".join(walk.parts), "too many levels of symbolic links")
        target = os.readlink(comp, dir_fd=cur)
        if target.startswith("/"):
            # Absolute target: the container's "/" is the image root.
            for fd, _ in walk.stack:
                os.close(fd)
            walk.stack.clear()
        walk.pending[:0] = target.split("/")
        return True

    @staticmethod
    def _descend(walk: _Walk, comp: str, cur: int, st: os.stat_result) -> int | None:
        """An fd of the directory ``comp``; None if a lookup meets a non-directory."""
        if not stat.S_ISDIR(st.st_mode):
            if not walk.create:
                return None  # looking up: a file in parent position means "absent"
            raise BadLayer("/".join(walk.parts), f"parent component {comp!r} is not a directory")
        try:
            return os.open(comp, _O_PATH_DIR, dir_fd=cur)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise BadLayer("/".join(walk.parts), f"{comp!r} changed under us") from exc
            raise
