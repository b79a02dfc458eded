"""Streaming readers for one layer: verify the blob, decompress once, hash the tar.

Pipeline (each stage is a file-like ``read(n)`` over the previous one)::

    blob file -> VerifiedReader (sha256 + size of the compressed blob, umoci's
                 VerifiedReadCloser: refuses to read past the expected size)
              -> decompressor (gzip via zlib, zstd via zstandard, or none)
              -> DiffIdReader (sha256 of the uncompressed tar = the diff_id, and a byte limit
                 that stops decompression bombs before they reach the disk)
              -> PrefetchReader (a worker thread runs all of the above, chunks ahead)
              -> tarfile in stream mode ("r|"), headers only; the applier copies file data

Digests are compared by :meth:`finish` once the whole stream has been consumed; the builder
discards its partial output on any mismatch.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from typing import IO, BinaryIO, Protocol, cast

import zstandard

from kata_ipu.rootfs.errors import (
    BlobDigestMismatch,
    CorruptLayer,
    DiffIdMismatch,
    LayerTooLarge,
    UnsupportedMedia,
)

CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class VerifiedReader:
    """sha256 and size of the compressed blob, checked at EOF."""

    def __init__(self, raw: BinaryIO, digest: str, size: int) -> None:
        self._raw = raw
        self._digest = digest
        self._size = size
        self._hash = hashlib.sha256()
        self._n = 0

    def read(self, n: int = -1, /) -> bytes:
        remaining = self._size - self._n
        if n < 0 or n > remaining:
            n = remaining
        if n == 0:
            # Peek: a blob longer than its descriptor is as bad as a different one.
            if self._raw.read(1):
                raise BlobDigestMismatch(self._digest, "(longer than descriptor)",
                                         self._size, self._size + 1)
            return b""
        data = self._raw.read(n)
        self._hash.update(data)
        self._n += len(data)
        return data

    def finish(self) -> None:
        while self.read(CHUNK):
            pass
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest or self._n != self._size:
            raise BlobDigestMismatch(self._digest, actual, self._size, self._n)


class GzipReader:
    """Inflate gzip (multi-member, like Go's gzip.Reader) with bounded output per call."""

    def __init__(self, src: Readable) -> None:
        self._src = src
        self._d = zlib.decompressobj(wbits=31)
        self._pending = b""
        self._eof = False
        self._started = False

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            n = CHUNK
        while not self._eof:
            if not self._pending:
                self._pending = self._src.read(CHUNK)
                if not self._pending:
                    if self._d.eof or not self._started:
                        # A blob that ends exactly between members (or is empty).
                        if not self._started:
                            raise CorruptLayer("empty gzip stream")
                        self._eof = True
                        return b""
                    raise CorruptLayer("truncated gzip stream (unexpected end of data)")
            self._started = True
            try:
                out = self._d.decompress(self._pending, n)
            except zlib.error as exc:
                raise CorruptLayer(f"invalid gzip data: {exc}") from exc
            if self._d.eof:
                # Next member (if any) starts in unused_data.
                self._pending = self._d.unused_data
                self._d = zlib.decompressobj(wbits=31)
                if not self._pending:
                    self._pending = self._src.read(CHUNK)
                    if not self._pending:
                        self._eof = True
                        return out
            else:
                self._pending = self._d.unconsumed_tail
            if out:
                return out
        return b""


class ZstdReader:
    """zstd frames via zstandard's bounded stream reader.

    zstandard's reader reports a truncated frame as a short stream, not an error; truncation is
    then caught by the tar parser (unexpected end) or by the diff_id check.
    """

    def __init__(self, src: Readable) -> None:
        self._r = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], src), read_size=CHUNK, read_across_frames=True)

    def read(self, n: int = -1, /) -> bytes:
        try:
            return bytes(self._r.read(CHUNK if n < 0 else n))
        except zstandard.ZstdError as exc:
            raise CorruptLayer(f"invalid zstd data: {exc}") from exc


class DiffIdReader:
    """Hashes the uncompressed tar and enforces a size limit (decompression bombs)."""

    def __init__(self, src: Readable, *, layer: int, diff_id: str, limit: int) -> None:
        self._src = src
        self._layer = layer
        self._diff_id = diff_id
        self._limit = limit
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(CHUNK if n < 0 else n)
        self.bytes_read += len(data)
        if self.bytes_read > self._limit:
            raise LayerTooLarge(f"layer {self._layer} uncompressed stream", self._limit)
        self._hash.update(data)
        return data

    def finish(self) -> str:
        """Drain what the tar parser left (end-of-archive padding) and check the diff_id."""
        while self.read(CHUNK):
            pass
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._diff_id:
            raise DiffIdMismatch(self._layer, self._diff_id, actual)
        return actual


def decompressor(compression: str, src: Readable) -> Readable:
    if compression == "gzip":
        return GzipReader(src)
    if compression == "zstd":
        return ZstdReader(src)
    if compression == "none":
        return src
    raise UnsupportedMedia(compression)


class PrefetchReader:
    """Reads ``src`` in a worker thread, a bounded number of chunks ahead.

    Decompression (zlib, zstandard) and hashing (hashlib) release the GIL, so inflating and
    hashing layer N's next megabytes overlaps with writing the current entries: on 2 cores
    the build approaches max(inflate, apply) instead of their sum. ``src`` is only ever read
    by the worker; call :meth:`drain` (after the tar end) and :meth:`close` (always) before
    touching ``src`` again.
    """

    def __init__(self, src: Readable, *, depth: int = 8) -> None:
        self._src = src
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._eof = False
        self._pos = 0
        self._thread = threading.Thread(target=self._run, name="kata-ipu-layer-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._src.read(CHUNK)
                if not self._put(data) or not data:
                    return
        except BaseException as exc:  # handed to the reading thread, raised there
            self._put(exc)

    def _fill(self) -> bool:
        while not self._buf:
            if self._eof:
                return False
            item = self._q.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return False
            self._buf = memoryview(item)
        return True

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes; short only at the end. Copies just what it returns, so small
        (header-sized) reads stay cheap, unlike tarfile's own stream buffer."""
        if n < 0:
            n = CHUNK
        if not self._fill():
            return b""
        if n <= len(self._buf):
            out = bytes(self._buf[:n])
            self._buf = self._buf[n:]
            self._pos += n
            return out
        parts = []
        want = n
        while want and self._fill():
            take = self._buf[:want]
            parts.append(take)
            self._buf = self._buf[len(take):]
            want -= len(take)
        data = b"".join(parts)
        self._pos += len(data)
        return data

    # Forward-only seek/tell, enough for tarfile's seekable mode ("r:"), which reads headers
    # straight from this object instead of through its copying stream buffer.
    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self._pos:
            raise OSError(f"prefetch reader cannot seek back (at {self._pos}, asked {pos})")
        while self._pos < pos:
            if not self.read(min(CHUNK, pos - self._pos)):
                break
        return self._pos

    def seekable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
