"""Read a blob while the store is still downloading it (the pull → build pipeline).

A :class:`BlobFollower` is a blocking, forward-only reader over one blob. It reads the bytes an
ingest of *this* process has already written (``ingest/<algo>-<hex>.data``), waits for more,
and ends at the blob's size. When the blob is already in ``blobs/`` (or another process is
downloading it) it simply reads the committed file once it exists.

The bytes it hands out are unverified until :meth:`BlobFollower.finish` returned: a consumer
must call it at the end and discard what it made from the bytes if it raises. ``finish`` does
not hash again what the ingest hashes anyway (the same bytes of the same file): it waits for
the ingest's own verdict (size and digest matched). A committed blob read from ``blobs/`` is
hashed while read, as any reader of a stored blob would. The store's invariant (``blobs/`` only
holds verified blobs) is untouched: the follower never writes.

Why following the data file is safe: the ingest writes through one unbuffered file and only
then advances ``BlobStatus.offset``, so every byte below ``offset`` is in the page cache; the
commit is a ``rename`` of that same inode, so an open descriptor keeps reading the same bytes
before and after it. An ingest that drops its bytes and starts over (the server ignored
``Range``) bumps ``BlobStatus.restarts`` *before* truncating; the follower checks it after every
read, so it never mixes bytes of two attempts (only the last one is verified): it raises
:class:`IngestRestarted` and the consumer starts over from the finished store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from kata_ipu.content.errors import DigestMismatch, SizeMismatch
from kata_ipu.content.status import BlobState, BlobStatus
from kata_ipu.errors import Aborted, DataLoss

POLL = 0.001
"""Seconds between looks at a growing ingest (1 ms: a 64 MiB layer arrives in ~100 chunks),
doubling while nothing arrives up to :data:`MAX_POLL` (a stalled download costs no CPU)."""
MAX_POLL = 0.05


class IngestFailed(DataLoss):
    """The download this reader followed failed (the pull reports the real error)."""

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"download of {digest} failed: {reason or 'unknown error'}")
        self.digest = digest


class IngestRestarted(Aborted):
    """The ingest dropped bytes this reader had already handed out (see the module doc)."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"download of {digest} started over while it was being read")
        self.digest = digest


class FollowAborted(Aborted):
    """The consumer gave up (its pull failed or was cancelled)."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"reading {digest} while it downloads: aborted")
        self.digest = digest


class BlobFollower:
    """See the module docstring. ``status_of`` returns this process's in-flight ingest status
    of the digest (or None); ``abort`` ends every wait with :class:`FollowAborted`."""

    def __init__(self, digest: str, size: int, blob_path: Path, ingest_path: Path,
                 status_of: Callable[[], BlobStatus | None], abort: threading.Event) -> None:
        self.digest = digest
        self.size = size
        self._blob_path = blob_path
        self._ingest_path = ingest_path
        self._status_of = status_of
        self._abort = abort
        self._fd = -1
        self._status: BlobStatus | None = None  # None: reading the committed blob
        self._restarts = 0  # the ingest's restart count when we attached
        self._hash = hashlib.sha256()  # only for a committed blob
        self._pos = 0
        self._poll = POLL

    # -- opening -------------------------------------------------------------------------

    def _try_open(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            self._fd = os.open(self._blob_path, os.O_RDONLY | os.O_CLOEXEC)
            self._status = None
            return True
        status = self._status_of()
        if status is None:
            return False
        if status.state is BlobState.FAILED:
            raise IngestFailed(self.digest, status.error)
        # Only once the ingest holds its lock and has opened the data file (DOWNLOADING) is
        # the file at the ingest path the one being written; before that it may be a stale
        # partial another ingest will still resume or truncate in place (same inode either way).
        if status.state not in (BlobState.DOWNLOADING, BlobState.VERIFYING, BlobState.DONE):
            return False
        try:
            self._fd = os.open(self._ingest_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # committed (renamed) or discarded meanwhile: look again
        self._status = status
        self._restarts = status.restarts
        return True

    def _wait(self) -> None:
        if self._abort.wait(self._poll):
            raise FollowAborted(self.digest)
        self._poll = min(self._poll * 2, MAX_POLL)

    def _ensure_open(self) -> None:
        while self._fd < 0:
            if self._try_open():
                return
            self._wait()

    # -- reading -------------------------------------------------------------------------

    def _limit(self) -> int:
        """How many bytes are known to be written (and stay written)."""
        st = self._status
        if st is None:
            return self.size
        if st.state is BlobState.FAILED:
            raise IngestFailed(self.digest, st.error)
        if st.state in (BlobState.VERIFYING, BlobState.DONE):
            return st.offset
        return min(st.offset, self.size)

    def available(self) -> int:
        """Bytes readable right now without waiting (opens the blob if possible)."""
        if self._fd < 0 and not self._try_open():
            return 0
        return max(0, self._limit() - self._pos)

    def complete(self) -> bool:
        """True once the whole blob is on disk (committed, or fully written by the ingest)."""
        if self._fd < 0 and not self._try_open():
            return False
        return self._limit() >= self.size

    def _check_restarts(self) -> None:
        st = self._status
        if st is not None and st.restarts != self._restarts:
            if self._pos:
                raise IngestRestarted(self.digest)
            self._restarts = st.restarts  # nothing handed out yet: follow the new attempt

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes (all remaining for ``n < 0``), never beyond the descriptor's
        size; waits for at least one byte; ``b""`` only at the blob's end."""
        self._ensure_open()
        while True:
            remaining = self.size - self._pos
            if remaining <= 0:
                return b""
            want = remaining if n < 0 else min(n, remaining)
            if self._status is None:  # the committed file: plain reads, hashed
                data = os.pread(self._fd, want, self._pos)
                if not data:
                    raise SizeMismatch(self.digest, self.size, self._pos,
                                       where="stored blob")
                self._hash.update(data)
                self._pos += len(data)
                return data
            self._check_restarts()
            avail = self._limit() - self._pos
            if avail > 0:
                data = os.pread(self._fd, min(want, avail), self._pos)
                # after the read: a restart may have replaced these bytes meanwhile
                self._check_restarts()
                if data:
                    self._pos += len(data)
                    self._poll = POLL
                    return data
            self._wait()

    def finish(self) -> None:
        """Read to the end, then raise unless exactly the blob was read (size and digest):
        the ingest's verdict when following it, the hash of what was read otherwise."""
        while self.read(1 << 20):
            pass
        st = self._status
        if st is None:
            if os.pread(self._fd, 1, self._pos):
                raise SizeMismatch(self.digest, self.size, self._pos + 1, where="stored blob")
            actual = "sha256:" + self._hash.hexdigest()
            if actual != self.digest:
                raise DigestMismatch(self.digest, actual, where="stored blob")
            return
        while not st.verified:
            if st.state is BlobState.FAILED:
                raise IngestFailed(self.digest, st.error)
            self._wait()
        self._check_restarts()

    def pread_tail(self, n: int) -> bytes:
        """The last ``n`` bytes, once :meth:`complete` (no waiting, position unchanged)."""
        self._ensure_open()
        return os.pread(self._fd, n, max(0, self.size - n))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlobFollower:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
