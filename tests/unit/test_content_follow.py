"""Reading a blob while the store downloads it (BlobFollower), and layer size hints."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zstandard

from kata_ipu.content.errors import DigestMismatch, SizeMismatch
from kata_ipu.content.follow import BlobFollower, FollowAborted, IngestFailed, IngestRestarted
from kata_ipu.content.ingest import IngestWriter
from kata_ipu.content.store import ContentStore
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.digest import digest_bytes
from kata_ipu.oci.manifest import Descriptor
from kata_ipu.rootfs.sizehint import from_gzip_tail, from_zstd_head, uncompressed_hint

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_path) -> Iterator[ContentStore]:
    s = ContentStore.open(tmp_path / "store")
    yield s
    s.close()


def desc(data: bytes) -> Descriptor:
    return Descriptor(mt.OCI_LAYER, digest_bytes(data), len(data))


def gated_feeder(data: bytes, chunk: int, gate: threading.Semaphore
                 ) -> Callable[[IngestWriter], None]:
    """Writes one chunk per release of ``gate``, so the test controls how far the ingest is."""
    def fill(w: IngestWriter) -> None:
        for i in range(w.offset, len(data), chunk):
            assert gate.acquire(timeout=30)
            w.write(data[i:i + chunk])
    return fill


def read_all(f: BlobFollower, n: int = 1000) -> bytes:
    out = bytearray()
    while chunk := f.read(n):
        out += chunk
    return bytes(out)


def start_fetch(store: ContentStore, d: Descriptor, fetcher: Callable[[IngestWriter], None]
                ) -> threading.Thread:
    """store.fetch from its own event loop thread (as the daemon's pull does)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(store.fetch(d, fetcher))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def test_follower_streams_a_growing_ingest_and_ends_at_the_size(store: ContentStore) -> None:
    data = os.urandom(50_000)
    d = desc(data)
    gate = threading.Semaphore(0)
    abort = threading.Event()
    t = start_fetch(store, d, gated_feeder(data, 10_000, gate))
    with store.follow(d, abort) as f:
        gate.release()  # first chunk only
        first = f.read(1 << 20)
        assert 0 < len(first) <= 10_000 and data.startswith(first)
        assert not f.complete()
        for _ in range(4):
            gate.release()
        rest = read_all(f)
        assert first + rest == data
        assert f.read(10) == b""  # at the end, however far the ingest is
        f.finish()  # the ingest's verdict: size and digest matched
    t.join(30)
    assert not t.errors and store.blob_path(d.digest).read_bytes() == data  # type: ignore[attr-defined]


def test_follower_of_a_committed_blob_reads_the_file(store: ContentStore) -> None:
    data = os.urandom(5000)
    d = desc(data)
    asyncio.run(store.fetch(d, lambda w: w.write(data)))
    with store.follow(d, threading.Event()) as f:
        assert f.complete() and f.pread_tail(4) == data[-4:]
        assert read_all(f, 777) == data
        f.finish()


@pytest.mark.parametrize(("damage", "error"), [
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], DigestMismatch),
    (lambda b: b + b"x", SizeMismatch),
    (lambda b: b[:-1], SizeMismatch),
])
def test_a_damaged_committed_blob_fails_finish(store: ContentStore, damage, error) -> None:
    data = os.urandom(5000)
    d = desc(data)
    asyncio.run(store.fetch(d, lambda w: w.write(data)))
    path = store.blob_path(d.digest)
    os.chmod(path, 0o644)
    path.write_bytes(damage(data))
    with store.follow(d, threading.Event()) as f, pytest.raises(error):
        f.finish()


def test_an_ingest_that_starts_over_fails_its_follower(store: ContentStore) -> None:
    """Bytes already handed out belong to an attempt that is never verified: refuse."""
    data = os.urandom(30_000)
    d = desc(data)
    gate = threading.Semaphore(0)

    def fill(w: IngestWriter) -> None:
        assert gate.acquire(timeout=30)
        w.write(b"\0" * 10_000)  # a first attempt with other bytes
        assert gate.acquire(timeout=30)
        w.restart()  # as when a server ignores Range
        w.write(data)

    t = start_fetch(store, d, fill)
    with store.follow(d, threading.Event()) as f:
        gate.release()
        assert f.read(1 << 20) == b"\0" * 10_000
        gate.release()
        with pytest.raises(IngestRestarted):
            read_all(f)
            f.finish()
    t.join(30)
    assert store.blob_path(d.digest).read_bytes() == data  # the store itself is fine


def test_failed_ingest_fails_the_follower_and_publishes_nothing(store: ContentStore) -> None:
    data = os.urandom(30_000)
    d = desc(data)
    bad = data[:20_000] + bytes([data[20_000] ^ 1]) + data[20_001:]
    gate = threading.Semaphore(0)
    t = start_fetch(store, d, gated_feeder(bad, 10_000, gate))
    with store.follow(d, threading.Event()) as f, pytest.raises(IngestFailed, match="digest"):
        gate.release()
        assert f.read(1)  # following the ingest now (a follower that arrives after a failed
        # ingest was forgotten cannot tell it from one not started yet: its abort covers that)
        gate.release()
        gate.release()
        read_all(f)  # may already raise: the ingest fails when it sees the last byte
        for _ in range(30_000):  # else wait for the verdict: the follower reports it
            f.available()
            time.sleep(0.001)
    t.join(30)
    assert isinstance(t.errors[0], DigestMismatch)  # type: ignore[attr-defined]
    assert not store.has(d.digest) and not store.partial_ingests()


def test_abort_ends_a_wait_for_bytes_that_never_come(store: ContentStore) -> None:
    data = os.urandom(1000)
    abort = threading.Event()
    result: list[BaseException] = []

    def reader() -> None:
        try:
            with store.follow(desc(data), abort) as f:
                f.read(10)  # no ingest was ever started: waits
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    abort.set()
    t.join(10)
    assert not t.is_alive() and isinstance(result[0], FollowAborted)


# -- size hints ---------------------------------------------------------------------------

def test_gzip_trailer_hint_and_its_limits() -> None:
    tar = os.urandom(100_000) + bytes(300_000)
    blob = gzip.compress(tar)
    assert uncompressed_hint(io.BytesIO(blob), "gzip", len(blob)) == len(tar)
    assert from_gzip_tail(blob[-4:], len(blob)) == len(tar)
    # a second, empty member: ISIZE says 0, less than any real layer -> no hint
    two = blob + gzip.compress(b"")
    assert uncompressed_hint(io.BytesIO(two), "gzip", len(two)) is None
    assert from_gzip_tail(b"\x01", len(blob)) is None


def test_zstd_and_uncompressed_hints() -> None:
    tar = os.urandom(50_000)
    with_size = zstandard.ZstdCompressor().compress(tar)
    assert from_zstd_head(with_size[:18], len(with_size)) == len(tar)
    without = zstandard.ZstdCompressor(write_content_size=False).compress(tar)
    assert from_zstd_head(without[:18], len(without)) is None
    assert from_zstd_head(b"not zstd", 100) is None
    assert uncompressed_hint(io.BytesIO(tar), "none", len(tar)) == len(tar)
