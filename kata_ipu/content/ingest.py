"""Ingests: where a blob is written before it becomes visible in ``blobs/``.

Lifecycle of an :class:`IngestWriter` (containerd's ``Writer``)::

    w = IngestWriter.open(store_root, digest, size)   # takes an exclusive flock on the ingest
    w.offset                   # bytes kept from an earlier, interrupted ingest (resume point)
    w.write(chunk) ...         # hashed while written; more than ``size`` bytes -> SizeMismatch
    w.commit()                 # size + digest check, fsync, rename into blobs/, fsync dir
    w.close()                  # releases the lock; an uncommitted partial file stays for resume

Any verification failure deletes the partial data before raising, so nothing unverified is ever
visible in ``blobs/`` and no broken partial is resumed. Files of one ingest, under ``ingest/``:
``<algo>-<hex>.lock`` (flock), ``<algo>-<hex>.data`` (the bytes so far).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from kata_ipu.content.errors import DigestMismatch, IngestBusy, SizeMismatch
from kata_ipu.content.status import BlobState, BlobStatus
from kata_ipu.oci.digest import Hasher, new_hasher, split_digest
from kata_ipu.osutil.atomicfile import fsync_dir

log = logging.getLogger("kata_ipu.content")

_REHASH_CHUNK = 1 << 20


def _lock(path: Path, *, wait: bool) -> int:
    """flock ``path`` (created if needed); retry if it was unlinked while we waited."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class IngestWriter:
    """Writes one blob under ``ingest/``, verifying size and digest while streaming."""

    def __init__(self, root: Path, blob_path: Path, digest: str, size: int, lock_fd: int,
                 status: BlobStatus | None) -> None:
        algo, hexd = split_digest(digest)
        self.digest = digest
        self.size = size
        self.blob_path = blob_path
        self.status = status if status is not None else BlobStatus(digest, size)
        self._lock_fd = lock_fd
        self._data_path = root / "ingest" / f"{algo}-{hexd}.data"
        self._lock_path = root / "ingest" / f"{algo}-{hexd}.lock"
        self._hasher: Hasher = new_hasher(digest)
        # Unbuffered: what write() accepted is in the page cache, so a killed process resumes
        # from exactly the bytes it reported (chunks are large, so no syscall storm).
        self._file = open(self._data_path, "ab+", buffering=0)  # noqa: SIM115 - see close()
        self._offset = 0
        self._committed = False
        self._resume()

    @classmethod
    def open(cls, root: Path, blob_path: Path, digest: str, size: int, *,
             status: BlobStatus | None = None, wait: bool = True) -> IngestWriter:
        algo, hexd = split_digest(digest)
        ingest = root / "ingest"
        ingest.mkdir(exist_ok=True)
        try:
            fd = _lock(ingest / f"{algo}-{hexd}.lock", wait=wait)
        except BlockingIOError as exc:
            raise IngestBusy(digest) from exc
        try:
            return cls(root, blob_path, digest, size, fd, status)
        except BaseException:
            os.close(fd)
            raise

    # -- state ---------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Bytes written so far (resume point for a ``Range`` request)."""
        return self._offset

    @property
    def committed(self) -> bool:
        return self._committed

    def _resume(self) -> None:
        self._file.seek(0, os.SEEK_END)
        existing = self._file.tell()
        if existing == 0:
            return
        if existing > self.size:
            log.warning("discarding oversized partial ingest",
                        extra={"digest": self.digest, "bytes": existing})
            self.restart()
            return
        self._file.seek(0)
        buf = bytearray(_REHASH_CHUNK)
        view = memoryview(buf)
        while True:
            n = self._file.readinto(buf)
            if not n:
                break
            self._hasher.update(view[:n])
            self._offset += n
        self.status.offset = self._offset
        log.info("resuming ingest", extra={"digest": self.digest, "offset": self._offset})

    def restart(self) -> None:
        """Drop the bytes written so far (the server ignored our ``Range``)."""
        self.status.restarts += 1  # first: a follower re-checks it after every read
        self._file.seek(0)
        self._file.truncate(0)
        self._hasher = new_hasher(self.digest)
        self._offset = 0
        self.status.offset = 0

    # -- writing -------------------------------------------------------------------------

    def write(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        if self._offset + n > self.size:
            actual = self._offset + n
            self.discard()
            raise SizeMismatch(self.digest, self.size, actual)
        view = memoryview(chunk)
        while view:
            written = self._file.write(view)
            view = view[written:]
        self._hasher.update(chunk)
        self._offset += n
        self.status.advance(n)

    def commit(self) -> None:
        """Verify and publish the blob; on any mismatch the partial data is deleted."""
        self.status.set_state(BlobState.VERIFYING)
        if self._offset != self.size:
            actual = self._offset
            self.discard()
            raise SizeMismatch(self.digest, self.size, actual)
        algo = self.digest.partition(":")[0]
        actual_digest = f"{algo}:{self._hasher.hexdigest()}"
        if actual_digest != self.digest:
            self.discard()
            raise DigestMismatch(self.digest, actual_digest)
        self.status.verified = True
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.blob_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self._data_path, 0o644)
        os.rename(self._data_path, self.blob_path)
        fsync_dir(self.blob_path.parent)
        self._committed = True
        self.status.set_state(BlobState.DONE)

    def discard(self) -> None:
        """Delete the partial data (verification failed or the caller gave up)."""
        if not self._file.closed:
            self._file.close()
        try:
            self._data_path.unlink()
        except FileNotFoundError:
            pass
        self._offset = 0

    def close(self) -> None:
        """Release the lock; keep uncommitted data for a later resume."""
        if not self._file.closed:
            self._file.close()
        if self._lock_fd < 0:
            return
        if self._committed or not self._data_path.exists():
            try:
                self._lock_path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> IngestWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
