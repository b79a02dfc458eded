"""Filesystem operations the applier needs, behind one interface (umoci's ``FsEval`` habit).

Every call names its target as (directory fd, single name), so nothing is resolved by path.
:class:`HostFsOps` does the real thing as root; a rootless or recording implementation can be
swapped in without touching :mod:`kata_ipu.rootfs.apply`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _proc(dirfd: int, name: str) -> str:
    # /proc/self/fd/N is a magic link to the directory itself, so "<it>/<name>" resolves only
    # the last component, relative to that exact directory: used for the *xattr calls, which
    # have no *at variant.
    return f"/proc/self/fd/{dirfd}/{name}"


@dataclass(frozen=True, slots=True)
class Meta:
    """Ownership, permission bits (including setuid/setgid/sticky), xattrs and mtime."""

    uid: int
    gid: int
    mode: int
    mtime_ns: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


class FsOps(Protocol):
    def write_file(self, dirfd: int, name: str, chunks: ChunkSource, size: int, meta: Meta,
                   sparse: Sequence[tuple[int, int]] | None = None) -> int: ...
    def set_meta(self, dirfd: int, name: str, meta: Meta, *, mtime: bool = True,
                 replace_xattrs: bool = False) -> None: ...
    def mkdir(self, dirfd: int, name: str) -> None: ...
    def symlink(self, dirfd: int, name: str, target: str) -> None: ...
    def link(self, src_dirfd: int, src_name: str, dirfd: int, name: str) -> None: ...
    def mknod(self, dirfd: int, name: str, kind: int, major: int, minor: int) -> None: ...
    def lutimes(self, dirfd: int, name: str, mtime_ns: int) -> None: ...
    def lstat(self, dirfd: int, name: str) -> os.stat_result | None: ...
    def remove_all(self, dirfd: int, name: str) -> None: ...
    def listdir(self, dirfd: int, name: str) -> list[str]: ...
    def open_dir(self, dirfd: int, name: str) -> int: ...


class ChunkSource(Protocol):
    def read(self, n: int, /) -> bytes: ...


class HostFsOps:
    """Real operations on the host kernel (needs root for devices and foreign owners)."""

    def write_file(self, dirfd: int, name: str, chunks: ChunkSource, size: int, meta: Meta,
                   sparse: Sequence[tuple[int, int]] | None = None) -> int:
        """Create ``name`` exclusively, copy its data, then apply ``meta`` through the same fd.

        ``size`` is the apparent size; for a sparse entry ``sparse`` lists the (offset, length)
        data segments stored in the archive, holes stay holes. Returns the data bytes read; a
        short count means the archive was truncated (the caller raises).
        """
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dirfd)
        try:
            segments = sparse if sparse is not None else ((0, size),)
            got = 0
            for offset, length in segments:
                pos, end = offset, offset + length
                while pos < end:
                    data = chunks.read(min(1 << 20, end - pos))
                    if not data:
                        return got
                    view = memoryview(data)
                    while view:
                        n = os.pwrite(fd, view, pos)
                        view = view[n:]
                        pos += n
                    got += len(data)
            if sparse is not None:
                os.ftruncate(fd, size)
            self._fmeta(fd, meta)
            return got
        finally:
            os.close(fd)

    @staticmethod
    def _fmeta(fd: int, meta: Meta, *, mtime: bool = True,
               replace_xattrs: bool = False) -> None:
        # chown first: it clears setuid/setgid and security.capability, so mode and xattrs
        # must come after it.
        os.fchown(fd, meta.uid, meta.gid)
        os.fchmod(fd, meta.mode)
        if replace_xattrs:
            # A header carries the entry's whole metadata: xattrs it does not list are gone
            # (umoci does the same when a layer re-declares an existing directory).
            for key in os.listxattr(fd):
                if key not in meta.xattrs and key != "security.selinux":
                    os.removexattr(fd, key)
        for key, value in meta.xattrs.items():
            os.setxattr(fd, key, value)
        if mtime:
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))

    def set_meta(self, dirfd: int, name: str, meta: Meta, *, mtime: bool = True,
                 replace_xattrs: bool = False) -> None:
        """Apply ``meta`` to an existing entry without following a final symlink."""
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.chown(name, meta.uid, meta.gid, dir_fd=dirfd, follow_symlinks=False)
            for key, value in meta.xattrs.items():
                os.setxattr(_proc(dirfd, name), key, value, follow_symlinks=False)
            if mtime:
                os.utime(name, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=dirfd,
                         follow_symlinks=False)
            return
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(name, flags, dir_fd=dirfd)
            try:
                self._fmeta(fd, meta, mtime=mtime, replace_xattrs=replace_xattrs)
            finally:
                os.close(fd)
            return
        # Devices and FIFOs: never open them (a FIFO open blocks, a device open has effects).
        os.chown(name, meta.uid, meta.gid, dir_fd=dirfd, follow_symlinks=False)
        self.chmod(dirfd, name, meta.mode)
        for key, value in meta.xattrs.items():
            os.setxattr(_proc(dirfd, name), key, value, follow_symlinks=False)
        if mtime:
            os.utime(name, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=dirfd,
                     follow_symlinks=False)

    def mkdir(self, dirfd: int, name: str) -> None:
        os.mkdir(name, 0o700, dir_fd=dirfd)

    def symlink(self, dirfd: int, name: str, target: str) -> None:
        os.symlink(target, name, dir_fd=dirfd)

    def link(self, src_dirfd: int, src_name: str, dirfd: int, name: str) -> None:
        # follow_symlinks=False: a hard link to a symlink links the symlink (tar semantics),
        # and it can never reach through it.
        os.link(src_name, name, src_dir_fd=src_dirfd, dst_dir_fd=dirfd, follow_symlinks=False)

    def mknod(self, dirfd: int, name: str, kind: int, major: int, minor: int) -> None:
        os.mknod(name, kind | 0o600, os.makedev(major, minor), dir_fd=dirfd)

    def lchown(self, dirfd: int, name: str, uid: int, gid: int) -> None:
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)

    def chmod(self, dirfd: int, name: str, mode: int) -> None:
        # Linux has no lchmod; go through an O_PATH fd so a symlink is never followed.
        fd = os.open(name, _O_PATH, dir_fd=dirfd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def lsetxattr(self, dirfd: int, name: str, key: str, value: bytes) -> None:
        os.setxattr(_proc(dirfd, name), key, value, follow_symlinks=False)

    def lutimes(self, dirfd: int, name: str, mtime_ns: int) -> None:
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dirfd, follow_symlinks=False)

    def lstat(self, dirfd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def unlink(self, dirfd: int, name: str) -> None:
        os.unlink(name, dir_fd=dirfd)

    def remove_all(self, dirfd: int, name: str) -> None:
        st = self.lstat(dirfd, name)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dirfd)
            return
        sub = self.open_dir(dirfd, name)
        try:
            for child in os.listdir(sub):
                self.remove_all(sub, child)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dirfd)

    def listdir(self, dirfd: int, name: str) -> list[str]:
        sub = self.open_dir(dirfd, name)
        try:
            return os.listdir(sub)
        finally:
            os.close(sub)

    def open_dir(self, dirfd: int, name: str) -> int:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dirfd)
