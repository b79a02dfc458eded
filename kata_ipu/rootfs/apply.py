"""Apply OCI layer tars, in order, to a directory tree (a staging dir or a mounted image).

One :class:`Applier` owns an image root. :meth:`Applier.apply_layer` reads one uncompressed tar
stream entry by entry. tarfile only parses headers (PAX, GNU long names, sparse maps), in its
seekable mode over a forward-only :class:`~kata_ipu.rootfs.tarstream.PrefetchReader`; file data
is copied straight from that reader into the target, so nothing is staged and tarfile's
extraction code and filters (which strip setuid bits, drop owners and resolve paths against the
host) are never used.

Whiteout semantics (OCI image-spec "Representing Changes", umoci's ``ociWhiteout``):

* ``dir/.wh.name`` deletes ``dir/name`` as it exists in the *lower* layers. The spec says a
  whiteout only applies to lower layers: an entry that this same layer already put at that path
  must survive, whatever the order inside the tar. So we keep the set of paths this layer wrote
  (``upper``) and never delete those, nor the directories leading to them.
* ``dir/.wh..wh..opq`` makes ``dir`` opaque: everything the lower layers had under it goes,
  everything this layer puts there (before or after the marker) stays. Same rule, applied to each
  child of ``dir``.
* Whiteout entries are markers, never materialized, and their targets are resolved with the same
  containment rules as any entry (``.wh...`` is an escape attempt, refused).
* A non-directory entry replaces whatever was at its path (a lower directory is removed with its
  contents); a directory entry over an existing directory merges and only updates metadata.
* Hard links are made to the path as it is *now* in the tree, so they may point at files from
  lower layers. Their header metadata is ignored (the inode's own metadata wins), as in tar.

Directory mtimes are set at the end of each layer, deepest first, because creating children
changes them.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from kata_ipu.rootfs.errors import (
    BadLayer,
    BuildCancelled,
    CorruptLayer,
    ImageTooLarge,
    PathEscape,
)
from kata_ipu.rootfs.fsops import FsOps, HostFsOps, Meta
from kata_ipu.rootfs.resolve import Root, split_entry_name
from kata_ipu.rootfs.tarstream import PrefetchReader, Readable

log = logging.getLogger("kata_ipu.rootfs")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."

Path_ = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a layer may make us write (honest sizing, hostile layers)."""

    max_file_bytes: int = 1 << 40
    max_total_bytes: int = 1 << 40


@dataclass(slots=True)
class LayerStats:
    entries: int = 0
    files: int = 0
    data_bytes: int = 0


class Applier:
    """Applies layers to the directory at ``root_path`` (which must exist)."""

    def __init__(self, root_path: str, *, fsops: FsOps | None = None,
                 limits: Limits | None = None, cancel: threading.Event | None = None,
                 reserve: Callable[[int], None] | None = None) -> None:
        self.fs: FsOps = fsops or HostFsOps()
        self.limits = limits or Limits()
        self.cancel = cancel
        # Called with a file's size before it is written, so a writer whose target can grow
        # (the loop-mounted image) makes room first.
        self.reserve = reserve
        self.root = Root(root_path)
        self.total_bytes = 0

    def close(self) -> None:
        self.root.close()

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one layer ----------------------------------------------------------------------

    def apply_layer(self, stream: Readable) -> LayerStats:
        stats = LayerStats()
        upper: set[Path_] = set()  # paths this layer wrote (whiteouts never touch them)
        keep: set[Path_] = set()  # upper paths and all their ancestors
        dir_mtimes: dict[Path_, int] = {}
        if not isinstance(stream, PrefetchReader):
            stream = PrefetchReader(stream)
            owned: PrefetchReader | None = stream
        else:
            owned = None
        try:
            # Seekable mode over the forward-only PrefetchReader: tarfile's stream mode ("r|")
            # re-copies its whole buffer on every 512-byte header read.
            tf = tarfile.open(fileobj=stream, mode="r:")  # type: ignore[call-overload]  # noqa: SIM115
        except tarfile.TarError as exc:
            if owned is not None:
                owned.close()
            raise CorruptLayer(f"not a tar stream: {exc}") from exc
        try:
            return self._apply(tf, stats, upper, keep, dir_mtimes)
        finally:
            if owned is not None:
                owned.close()

    def _apply(self, tf: tarfile.TarFile, stats: LayerStats, upper: set[Path_],
               keep: set[Path_], dir_mtimes: dict[Path_, int]) -> LayerStats:
        with tf:
            while True:
                if self.cancel is not None and self.cancel.is_set():
                    raise BuildCancelled()
                self.root.begin_entry()
                try:
                    member = tf.next()
                except tarfile.TarError as exc:
                    raise CorruptLayer(f"bad tar header: {exc}") from exc
                if member is None:
                    break
                tf.members.clear()  # type: ignore[attr-defined]  # else it keeps every TarInfo
                stats.entries += 1
                canon = self._entry(tf, member, upper, keep, dir_mtimes, stats)
                if canon is not None:
                    upper.add(canon)
                    for i in range(len(canon) + 1):
                        keep.add(canon[:i])
        self.root.begin_entry()
        # Deepest first, so setting a child's mtime cannot disturb its parent's afterwards.
        for canon in sorted(dir_mtimes, key=len, reverse=True):
            found = self.root.parent(canon[:-1], create=False) if canon else (self.root.fd, ())
            if found is None:
                continue
            dirfd = found[0]
            name = canon[-1] if canon else "."
            st = self.fs.lstat(dirfd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                self.fs.lutimes(dirfd, name, dir_mtimes[canon])
        return stats

    # -- one entry ----------------------------------------------------------------------

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, upper: set[Path_],
               keep: set[Path_], dir_mtimes: dict[Path_, int],
               stats: LayerStats) -> Path_ | None:
        parts = split_entry_name(m.name)
        meta = Meta(uid=m.uid, gid=m.gid, mode=m.mode & 0o7777, mtime_ns=int(m.mtime) * 10**9,
                    xattrs=_xattrs(m))
        if not parts:
            return self._root_entry(m, meta, dir_mtimes)
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(m.name, parts, upper, keep)
            return None

        found = self.root.parent(parts[:-1], create=True)
        assert found is not None
        dirfd, pcanon = found
        canon = (*pcanon, base)
        existing = self.fs.lstat(dirfd, base)

        link_src: tuple[int, str] | None = None
        if m.islnk():
            link_src = self._link_source(m)
            src_st = self.fs.lstat(*link_src)
            if existing is not None and src_st is not None and (
                    existing.st_ino, existing.st_dev) == (src_st.st_ino, src_st.st_dev):
                return canon  # already the same inode (a link to itself)

        if existing is not None:
            if m.isdir() and stat.S_ISDIR(existing.st_mode):
                self.fs.set_meta(dirfd, base, meta, mtime=False, replace_xattrs=True)
                dir_mtimes[canon] = meta.mtime_ns
                return canon
            # Replacement: whatever was here (file, link, or a whole directory) goes.
            if stat.S_ISDIR(existing.st_mode) or stat.S_ISLNK(existing.st_mode):
                self.root.invalidate_after_entry()
            self.fs.remove_all(dirfd, base)

        if m.isreg():
            self._regular(tf, m, dirfd, base, meta, stats)
        elif m.isdir():
            self.fs.mkdir(dirfd, base)
            self.fs.set_meta(dirfd, base, meta, mtime=False)
            dir_mtimes[canon] = meta.mtime_ns
        else:
            self._special(m, dirfd, base, meta, link_src)
        return canon

    def _root_entry(self, m: tarfile.TarInfo, meta: Meta,
                    dir_mtimes: dict[Path_, int]) -> Path_:
        """The root directory itself ("./"): only its metadata can change."""
        if not m.isdir():
            raise BadLayer(m.name, "the image root can only be a directory")
        self.fs.set_meta(self.root.fd, ".", meta, mtime=False, replace_xattrs=True)
        dir_mtimes[()] = meta.mtime_ns
        return ()

    def _special(self, m: tarfile.TarInfo, dirfd: int, base: str, meta: Meta,
                 link_src: tuple[int, str] | None) -> None:
        """A symlink, hardlink, device node or FIFO (neither a regular file nor a directory)."""
        if m.issym():
            if "\x00" in m.linkname:
                raise PathEscape(m.name, "symlink target contains a NUL byte")
            # The target is stored verbatim: it is data, resolved later inside the container
            # (or by us, inside the root, if a later entry goes through it).
            self.fs.symlink(dirfd, base, m.linkname)
            self.fs.set_meta(dirfd, base, meta)
        elif m.islnk():
            assert link_src is not None
            try:
                self.fs.link(link_src[0], link_src[1], dirfd, base)
            except FileNotFoundError as exc:
                raise BadLayer(m.name, f"hardlink target {m.linkname!r} does not exist") from exc
            except PermissionError as exc:
                raise BadLayer(m.name, f"cannot hardlink to {m.linkname!r}") from exc
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            self.fs.mknod(dirfd, base, kind, m.devmajor, m.devminor)
            self.fs.set_meta(dirfd, base, meta)
        else:
            raise BadLayer(m.name, f"unsupported tar entry type {m.type!r}")

    def _regular(self, tf: tarfile.TarFile, m: tarfile.TarInfo, dirfd: int, base: str,
                 meta: Meta, stats: LayerStats) -> None:
        size = m.size
        if size > self.limits.max_file_bytes:
            raise ImageTooLarge(size, self.limits.max_file_bytes)
        if self.total_bytes + size > self.limits.max_total_bytes:
            raise ImageTooLarge(self.total_bytes + size, self.limits.max_total_bytes)
        sparse: Sequence[tuple[int, int]] | None = None
        stored = size
        if m.issparse():
            sparse = [(int(o), int(n)) for o, n in cast(list[tuple[int, int]], m.sparse or [])]
            stored = sum(n for _, n in sparse)
            if any(o < 0 or n < 0 or o + n > size for o, n in sparse):
                raise BadLayer(m.name, "sparse map points outside the file")
        if self.reserve is not None:
            self.reserve(size)
        # tf.fileobj sits at this member's data; tarfile skips to the next header itself.
        got = self.fs.write_file(dirfd, base, cast(Readable, tf.fileobj), size, meta, sparse)
        if got != stored:
            raise CorruptLayer(f"entry {m.name!r}: archive ends after {got} of {stored} bytes")
        self.total_bytes += size
        stats.files += 1
        stats.data_bytes += size

    def _link_source(self, m: tarfile.TarInfo) -> tuple[int, str]:
        target = split_entry_name(m.linkname)
        if not target:
            raise BadLayer(m.name, "hardlink to the image root")
        found = self.root.parent(target[:-1], create=False)
        if found is None:
            raise BadLayer(m.name, f"hardlink target {m.linkname!r} does not exist")
        st = self.fs.lstat(found[0], target[-1])
        if st is None:
            raise BadLayer(m.name, f"hardlink target {m.linkname!r} does not exist")
        if stat.S_ISDIR(st.st_mode):
            raise BadLayer(m.name, f"hardlink target {m.linkname!r} is a directory")
        return found[0], target[-1]

    # -- whiteouts ----------------------------------------------------------------------

    def _whiteout(self, raw: str, parts: Path_, upper: set[Path_], keep: set[Path_]) -> None:
        base = parts[-1]
        found = self.root.parent(parts[:-1], create=False)
        if base == OPAQUE_MARKER:
            if found is None:
                return  # nothing below to hide
            dirfd, pcanon = found
            for child in sorted(self.fs.listdir(dirfd, ".")):
                self._remove_lower(dirfd, child, (*pcanon, child), upper, keep)
            return
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise PathEscape(raw, f"whiteout of {target!r}")
        if found is None:
            return  # the parent is not there, so neither is the target
        dirfd, pcanon = found
        self._remove_lower(dirfd, target, (*pcanon, target), upper, keep)

    def _remove_lower(self, dirfd: int, name: str, canon: Path_, upper: set[Path_],
                      keep: set[Path_]) -> None:
        """Remove what lower layers have at ``canon``, sparing what this layer wrote."""
        if canon in upper:
            return  # written by this layer: a same-layer whiteout cannot hide it
        st = self.fs.lstat(dirfd, name)
        if st is None:
            return
        self.root.invalidate_after_entry()
        if canon in keep and stat.S_ISDIR(st.st_mode):
            # An implicit parent of something this layer wrote: keep it, clean inside it.
            sub = self.fs.open_dir(dirfd, name)
            try:
                for child in sorted(self.fs.listdir(sub, ".")):
                    self._remove_lower(sub, child, (*canon, child), upper, keep)
            finally:
                os.close(sub)
            return
        self.fs.remove_all(dirfd, name)


def _xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith(XATTR_PAX_PREFIX):
            # tarfile decoded the raw value as UTF-8 with surrogateescape; undo that exactly.
            out[key[len(XATTR_PAX_PREFIX):]] = value.encode("utf-8", "surrogateescape")
    return out
