"""Content store: verify-while-streaming ingests, resume, single-flight, leases, GC, usage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_ipu.content import gc
from kata_ipu.content.errors import DigestMismatch, IngestBusy, SizeMismatch
from kata_ipu.content.ingest import IngestWriter
from kata_ipu.content.status import BlobState, BlobStatus
from kata_ipu.content.store import ContentStore
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.digest import InvalidDigest, digest_bytes
from kata_ipu.oci.manifest import Descriptor


def desc(data: bytes, media_type: str = mt.OCI_LAYER) -> Descriptor:
    return Descriptor(media_type, digest_bytes(data), len(data))


def feeder(data: bytes, chunk: int = 7):
    def fill(w: IngestWriter) -> None:
        for i in range(w.offset, len(data), chunk):
            w.write(data[i:i + chunk])
    return fill


@pytest.fixture
def store(tmp_path):
    s = ContentStore.open(tmp_path / "store")
    yield s
    s.close()


def test_open_creates_oci_layout(store):
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((store.root / "index.json").read_text())["manifests"] == []


def test_ingest_verifies_and_publishes(store):
    data = os.urandom(10_000)
    d = desc(data)
    status = BlobStatus(d.digest, d.size)
    res = store.ingest_blocking(d, feeder(data), status)
    assert res.downloaded and store.blob_path(d.digest).read_bytes() == data
    assert status.state is BlobState.DONE and status.offset == status.total == len(data)
    assert not store.partial_ingests()
    again = store.ingest_blocking(d, feeder(b"unused"))
    assert not again.downloaded


@pytest.mark.parametrize(("payload", "error", "text"), [
    (b"x" * 100, DigestMismatch, "expected sha256:"),
    (b"x" * 101, SizeMismatch, "larger than declared: expected 100 bytes, got 101+"),
    (b"x" * 99, SizeMismatch, "smaller than declared: expected 100 bytes, got 99"),
    (b"", SizeMismatch, "expected 100 bytes, got 0"),
])
def test_bad_bytes_leave_nothing(store, payload, error, text):
    d = Descriptor(mt.OCI_LAYER, digest_bytes(b"y" * 100), 100)
    with pytest.raises(error, match=text) as info:
        store.ingest_blocking(d, feeder(payload))
    if isinstance(info.value, DigestMismatch):
        assert info.value.expected == d.digest
        assert info.value.actual == digest_bytes(payload)
    assert not store.has(d.digest)
    assert not store.partial_ingests()
    assert not list((store.root / "ingest").iterdir())


def test_resume_after_interruption(store):
    data = os.urandom(50_000)
    d = desc(data)

    def half(w: IngestWriter) -> None:
        w.write(data[:20_000])
        raise ConnectionResetError("cut")

    with pytest.raises(ConnectionResetError):
        store.ingest_blocking(d, half)
    assert store.partial_ingests() == {d.digest: 20_000}
    assert not store.has(d.digest)
    offsets = []

    def rest(w: IngestWriter) -> None:
        offsets.append(w.offset)
        w.write(data[w.offset:])

    store.ingest_blocking(d, rest)
    assert offsets == [20_000]
    assert store.blob_path(d.digest).read_bytes() == data


def test_resumed_garbage_is_caught(store):
    data = os.urandom(1000)
    d = desc(data)
    (store.root / "ingest").mkdir(exist_ok=True)
    algo, hexd = d.digest.split(":")
    (store.root / "ingest" / f"{algo}-{hexd}.data").write_bytes(b"\0" * 500)
    with pytest.raises(DigestMismatch):
        store.ingest_blocking(d, lambda w: w.write(data[w.offset:]))
    assert not store.partial_ingests()
    store.ingest_blocking(d, lambda w: w.write(data[w.offset:]))  # retry starts from zero
    assert store.has(d.digest)


def test_ingest_lock_is_exclusive(store):
    d = desc(b"abc")
    with IngestWriter.open(store.root, store.blob_path(d.digest), d.digest, d.size), \
            pytest.raises(IngestBusy):
        IngestWriter.open(store.root, store.blob_path(d.digest), d.digest, d.size, wait=False)


def test_invalid_digest_rejected(store):
    with pytest.raises(InvalidDigest, match="sha256:abc"):
        store.blob_path("sha256:abc")


def test_single_flight_in_process(store):
    data = os.urandom(200_000)
    d = desc(data)
    calls = []
    gate = threading.Event()

    def slow(w: IngestWriter) -> None:
        calls.append(1)
        gate.wait(5)
        w.write(data)

    async def main():
        tasks = [asyncio.create_task(store.fetch(d, slow)) for _ in range(5)]
        await asyncio.sleep(0)
        while not calls:
            await asyncio.sleep(0.01)
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(calls) == 1
    assert sum(r.downloaded for r in results) == 1
    assert store.blob_path(d.digest).read_bytes() == data


# Random interleavings: writers of the same or different digests, some corrupt, some cut,
# racing in threads; a watcher checks every file that ever becomes visible in blobs/.
_job = st.tuples(st.integers(0, 2), st.sampled_from(["ok", "corrupt", "cut", "long"]),
                 st.integers(1, 4096))


def _watch_blobs(store: ContentStore, stop: threading.Event, bad: list[str]) -> None:
    """Until ``stop``: every blob visible in blobs/ must hash to its name (else into ``bad``)."""
    while not stop.is_set():
        for digest in store.all_blobs():
            try:
                data = store.blob_path(digest).read_bytes()
            except FileNotFoundError:
                continue
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                bad.append(digest)


def _ingest_job(store: ContentStore, payloads: list[bytes], descs: list[Descriptor],
                job: tuple[int, str, int]) -> None:
    """One writer: the right bytes, corrupt ones, too many, or a connection cut halfway."""
    which, mode, chunk = job
    data = payloads[which]
    if mode == "corrupt":
        data = data[:-1] + bytes([data[-1] ^ 1])
    elif mode == "long":
        data = data + b"!"

    def fill(w: IngestWriter) -> None:
        for i in range(w.offset, len(data), chunk):
            if mode == "cut" and i > len(data) // 2:
                raise ConnectionResetError("cut")
            w.write(data[i:i + chunk])
    try:
        store.ingest_blocking(descs[which], fill)
    except (DigestMismatch, SizeMismatch, ConnectionResetError):
        pass


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_job, min_size=2, max_size=8))
def test_concurrent_ingests_never_expose_unverified_blobs(tmp_path_factory, jobs):
    store = ContentStore.open(tmp_path_factory.mktemp("hyp"))
    payloads = [bytes([i]) * (3000 + 1000 * i) + os.urandom(64) for i in range(3)]
    descs = [desc(p) for p in payloads]
    bad: list[str] = []
    stop = threading.Event()

    watcher = threading.Thread(target=_watch_blobs, args=(store, stop, bad))
    watcher.start()
    threads = [threading.Thread(target=_ingest_job, args=(store, payloads, descs, j))
               for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert bad == []
    for digest in store.all_blobs():
        assert store.blob_path(digest).read_bytes() in payloads
    for which, mode, _ in jobs:
        if mode == "ok":
            assert store.has(descs[which].digest)


def _image(store: ContentStore, layers: list[bytes], name: str | None) -> Descriptor:
    ldescs = [store.write_blob(data, mt.OCI_LAYER) for data in layers]
    cfg = store.write_blob(json.dumps({
        "os": "linux", "architecture": "amd64",
        "rootfs": {"type": "layers", "diff_ids": [d.digest for d in ldescs]}}).encode(),
        mt.OCI_CONFIG)
    m = store.write_blob(json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": cfg.to_json(),
        "layers": [d.to_json() for d in ldescs]}).encode(), mt.OCI_MANIFEST)
    if name:
        store.tag(name, m)
    return m


def test_gc_keeps_tagged_and_leased_content(store):
    shared = os.urandom(8192)
    a = _image(store, [shared, os.urandom(8192)], "a")
    b = _image(store, [shared, os.urandom(8192)], None)
    orphan = store.write_blob(os.urandom(4096), mt.OCI_LAYER)
    store.leases.create("base:b", [b])
    res = gc.collect(store)
    assert res.removed_blobs == (orphan.digest,)
    assert not store.has(orphan.digest)
    for m in (a, b):
        assert store.has(m.digest)
        for layer in store.read_manifest(m.digest).layers:
            assert store.has(layer.digest)
    store.leases.delete("base:b")
    res = gc.collect(store)
    assert b.digest in res.removed_blobs and store.has(a.digest)
    assert store.has(digest_bytes(shared))  # still used by a


def test_gc_high_water_mark_evicts_unleased_lru(store):
    imgs = [_image(store, [os.urandom(64 * 1024)], f"img{i}") for i in range(4)]
    store.leases.create("base:img0", [imgs[0]])  # the oldest, but leased
    usage = store.usage()
    assert usage.disk_bytes >= usage.blob_bytes >= 4 * 64 * 1024
    noop = gc.collect(store, high_water=usage.disk_bytes + 1)
    assert noop.removed_blobs == () and noop.evicted_tags == ()
    res = gc.collect(store, high_water=usage.disk_bytes - 1,
                     low_water=usage.disk_bytes - 100 * 1024)
    assert res.evicted_tags == ("img1", "img2")  # LRU order, skipping the leased img0
    assert res.usage_after <= usage.disk_bytes - 100 * 1024
    assert res.reclaimed_bytes > 0
    assert store.has(imgs[0].digest) and store.has(imgs[3].digest)
    assert {i.name for i in store.images()} == {"img0", "img3"}


def test_temporary_lease_of_dead_process_is_ignored(store):
    m = _image(store, [b"layer"], None)
    lease = store.leases.create("pull-x", [m], temporary=True)
    assert lease.alive
    path = store.leases.dir / "pull-x.json"
    raw = json.loads(path.read_text())
    raw["pid"] = 2 ** 22 + 12345  # beyond pid_max defaults: not a live process
    path.write_text(json.dumps(raw))
    gc.collect(store)
    assert not store.has(m.digest)
    assert store.leases.list() == []


def test_tags_in_index_json(store):
    m = _image(store, [b"l1"], "reg/x:1")
    assert store.resolve("reg/x:1").digest == m.digest
    store.tag("reg/x:1", m)
    assert [i.name for i in store.images()] == ["reg/x:1"]
    store.untag("reg/x:1")
    assert store.images() == []
