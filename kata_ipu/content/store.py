"""The content store: an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``).

Layout on disk (readable by ``skopeo``/``umoci`` as ``oci:<root>:<name>``)::

    <root>/oci-layout                 {"imageLayoutVersion": "1.0.0"}
    <root>/index.json                 tagged images (annotation org.opencontainers.image.ref.name)
    <root>/blobs/<algo>/<hex>         verified blobs only
    <root>/ingest/                    partial downloads and their locks (see ingest.py)
    <root>/leases/                    GC holds (see leases.py)
    <root>/.lock                      flock serialising index.json updates and GC

Lifecycle: ``ContentStore(root)`` only remembers the path; :meth:`ContentStore.open` creates the
layout if needed. Blobs arrive through :meth:`fetch` (async, single-flight per digest, blocking
work in the store's thread pool) or :meth:`write_blob` (small JSON blobs). :meth:`close` stops the
thread pool. Typed accessors (:meth:`blob_path`, :meth:`read_manifest`, :meth:`read_config`, ...)
are what the rootfs builder uses.

Size (over ~400 lines): the store's typed accessors and its single-flight fetch share the
layout lock and thread pool; ingest, follow, leases and GC are already modules of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_ipu.content.errors import BlobNotFound, InvalidLayout, RefNotFound
from kata_ipu.content.follow import BlobFollower
from kata_ipu.content.ingest import IngestWriter
from kata_ipu.content.leases import LeaseManager
from kata_ipu.content.status import BlobProgress, BlobState, BlobStatus
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.digest import digest_bytes, split_digest
from kata_ipu.oci.manifest import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_any,
    parse_config,
    parse_descriptor,
    parse_index,
    parse_manifest,
)
from kata_ipu.osutil.atomicfile import write_atomic

log = logging.getLogger("kata_ipu.content")

PULLED_AT = "io.katacontainers.ipu.pulled-at"
"""index.json annotation: when the tag was (re)written, used as LRU order by GC eviction."""

MAX_JSON_BLOB = 8 << 20

Fetcher = Callable[[IngestWriter], None]
"""Fills an ingest writer (from ``writer.offset`` on) and returns; the store commits it."""


@dataclass(frozen=True, slots=True)
class TaggedImage:
    name: str
    descriptor: Descriptor
    pulled_at: float


@dataclass(frozen=True, slots=True)
class FetchResult:
    digest: str
    downloaded: bool
    """True if this call's ingest wrote the blob; False if it was there or shared."""
    bytes_fetched: int


@dataclass(frozen=True, slots=True)
class Usage:
    blobs: int
    blob_bytes: int
    """Sum of apparent blob sizes."""
    disk_bytes: int
    """Real allocated bytes (st_blocks) of everything under the root, ingests included."""
    ingest_bytes: int


class ContentStore:
    """A content-addressed blob store in OCI image-layout form."""

    def __init__(self, root: str | os.PathLike[str], *, max_workers: int = 8) -> None:
        self.root = Path(root)
        self.leases = LeaseManager(self.root)
        self._max_workers = max_workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._mu = threading.Lock()
        self._inflight: dict[str, concurrent.futures.Future[FetchResult]] = {}
        self._statuses: dict[str, BlobStatus] = {}

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike[str], **kwargs: Any) -> ContentStore:
        """Create the layout under ``root`` if missing and return the store."""
        store = cls(root, **kwargs)
        store.root.mkdir(parents=True, exist_ok=True)
        (store.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (store.root / "ingest").mkdir(exist_ok=True)
        layout = store.root / "oci-layout"
        if not layout.exists():
            _atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}')
        if not (store.root / "index.json").exists():
            store._write_index([])
        return store

    def close(self) -> None:
        with self._mu:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> ContentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Path of a verified blob (it may not exist; see :meth:`has`)."""
        algo, hexd = split_digest(digest)
        return self.root / "blobs" / algo / hexd

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(digest) from exc

    def read_blob(self, digest: str, *, max_size: int = MAX_JSON_BLOB) -> bytes:
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(max_size + 1)
        except FileNotFoundError as exc:
            raise BlobNotFound(digest) from exc
        if len(data) > max_size:
            raise InvalidLayout(f"blob {digest} is larger than {max_size} bytes")
        return data

    def read_any(self, digest: str, media_type: str | None = None) -> Manifest | Index:
        return parse_any(self.read_blob(digest), media_type=media_type,
                         where=f"{digest} in {self.root}")

    def read_manifest(self, digest: str) -> Manifest:
        return parse_manifest(self.read_blob(digest), where=f"{digest} in {self.root}")

    def read_index(self, digest: str) -> Index:
        return parse_index(self.read_blob(digest), where=f"{digest} in {self.root}")

    def read_config(self, manifest_or_digest: Manifest | str) -> ImageConfig:
        """The image config of a manifest (object or digest)."""
        manifest = (self.read_manifest(manifest_or_digest)
                    if isinstance(manifest_or_digest, str) else manifest_or_digest)
        digest = manifest.config.digest
        return parse_config(self.read_blob(digest), where=f"config {digest}")

    def layer_paths(self, manifest_digest: str) -> list[tuple[Descriptor, Path]]:
        """Layers of an image, bottom first, with their blob paths (for the rootfs builder)."""
        manifest = self.read_manifest(manifest_digest)
        return [(layer, self.blob_path(layer.digest)) for layer in manifest.layers]

    def write_blob(self, data: bytes, media_type: str) -> Descriptor:
        """Store a small blob synchronously (manifests, configs)."""
        digest = digest_bytes(data)
        path = self.blob_path(digest)
        if not path.exists():
            with IngestWriter.open(self.root, path, digest, len(data)) as w:
                if not path.exists():
                    w.restart()
                    w.write(data)
                    w.commit()
        return Descriptor(media_type, digest, len(data))

    def ingest_blocking(self, desc: Descriptor, fetcher: Fetcher,
                        status: BlobStatus | None = None) -> FetchResult:
        """Blocking ingest: lock, resume, fill via ``fetcher``, verify, publish."""
        status = status or BlobStatus(desc.digest, desc.size, desc.media_type)
        path = self.blob_path(desc.digest)
        if path.exists():
            status.offset = desc.size
            status.set_state(BlobState.EXISTS)
            return FetchResult(desc.digest, False, 0)
        status.set_state(BlobState.WAITING)
        with IngestWriter.open(self.root, path, desc.digest, desc.size, status=status) as w:
            if path.exists():  # another process finished it while we waited for the lock
                w.discard()
                status.offset = desc.size
                status.set_state(BlobState.EXISTS)
                return FetchResult(desc.digest, False, 0)
            status.set_state(BlobState.DOWNLOADING)
            t0 = time.monotonic()
            try:
                if w.offset < desc.size or desc.size == 0:
                    fetcher(w)
                t1 = time.monotonic()
                w.commit()
            except BaseException as exc:
                status.set_state(BlobState.FAILED, str(exc) or type(exc).__name__)
                raise
            log.debug("blob ingested", extra={
                "digest": desc.digest, "bytes": status.fetched,
                "download_seconds": round(t1 - t0, 4),
                "commit_seconds": round(time.monotonic() - t1, 4)})
            return FetchResult(desc.digest, True, status.fetched)

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._mu:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self._max_workers, thread_name_prefix="kata-ipu-ingest")
            return self._pool

    def status_for(self, desc: Descriptor) -> BlobStatus:
        """The shared status object of an (in-flight or new) ingest of ``desc``."""
        with self._mu:
            st = self._statuses.get(desc.digest)
            if st is None:
                st = BlobStatus(desc.digest, desc.size, desc.media_type)
            return st

    async def fetch(self, desc: Descriptor, fetcher: Fetcher,
                    status: BlobStatus | None = None) -> FetchResult:
        """Make ``desc`` present; concurrent calls for one digest share a single download.

        The download runs in the store's thread pool; cancelling the awaiting task does not
        abort it (its result still lands in the store for the next caller).
        """
        if self.has(desc.digest):
            if status is not None:
                status.offset = desc.size
                status.set_state(BlobState.EXISTS)
            return FetchResult(desc.digest, False, 0)
        pool = self._executor()
        with self._mu:
            fut = self._inflight.get(desc.digest)
            leader = fut is None
            shared = self._statuses.get(desc.digest)
            if fut is None:
                st = status or BlobStatus(desc.digest, desc.size, desc.media_type)
                self._statuses[desc.digest] = shared = st
                fut = pool.submit(self.ingest_blocking, desc, fetcher, st)
                self._inflight[desc.digest] = fut
                digest = desc.digest
                fut.add_done_callback(lambda _f: self._forget(digest))
        result = await _await_thread_future(fut)
        if leader:
            return result
        if status is not None and status is not shared:
            status.offset = desc.size
            status.set_state(BlobState.EXISTS)
        return FetchResult(desc.digest, False, 0)

    def follow(self, desc: Descriptor, abort: threading.Event) -> BlobFollower:
        """A reader of ``desc`` that streams it while this process downloads it (see
        :mod:`~kata_ipu.content.follow`: the bytes are unverified until the ingest commits).
        """
        algo, hexd = split_digest(desc.digest)

        def status_of() -> BlobStatus | None:
            with self._mu:
                return self._statuses.get(desc.digest)

        return BlobFollower(desc.digest, desc.size, self.blob_path(desc.digest),
                            self.root / "ingest" / f"{algo}-{hexd}.data", status_of, abort)

    def _forget(self, digest: str) -> None:
        with self._mu:
            self._inflight.pop(digest, None)
            self._statuses.pop(digest, None)

    def active(self) -> list[BlobProgress]:
        """Progress of ingests running in this process."""
        with self._mu:
            return [s.snapshot() for s in self._statuses.values()]

    def partial_ingests(self) -> dict[str, int]:
        """Digest → bytes of partial data on disk (resumable)."""
        out: dict[str, int] = {}
        ingest = self.root / "ingest"
        if not ingest.is_dir():
            return out
        for p in ingest.glob("*.data"):
            algo, _, hexd = p.stem.partition("-")
            with contextlib.suppress(FileNotFoundError):
                out[f"{algo}:{hexd}"] = p.stat().st_size
        return out

    # -- index.json (tags) ---------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive store lock (index.json updates, GC)."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_index_raw(self) -> list[dict[str, Any]]:
        path = self.root / "index.json"
        try:
            obj = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise InvalidLayout(f"{self.root} has no index.json (not an OCI layout)") from exc
        except ValueError as exc:
            raise InvalidLayout(f"{path} is not valid JSON: {exc}") from exc
        manifests = obj.get("manifests") if isinstance(obj, dict) else None
        if not isinstance(manifests, list):
            raise InvalidLayout(f"{path} has no 'manifests' list")
        return manifests

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        data = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}
        _atomic_write(self.root / "index.json",
                      json.dumps(data, indent=1, sort_keys=True).encode())

    def images(self) -> list[TaggedImage]:
        out = []
        for raw in self._read_index_raw():
            desc = parse_descriptor(raw, f"{self.root}/index.json")
            name = desc.annotations.get(mt.REF_NAME)
            if name:
                out.append(TaggedImage(name, desc, float(desc.annotations.get(PULLED_AT, 0))))
        return out

    def resolve(self, name: str) -> Descriptor:
        """The descriptor tagged ``name`` in index.json."""
        for img in self.images():
            if img.name == name:
                return img.descriptor
        raise RefNotFound(name)

    def tag(self, name: str, desc: Descriptor) -> Descriptor:
        """Point ``name`` at ``desc`` in index.json (replacing an older tag of that name)."""
        annotations = {**desc.annotations, mt.REF_NAME: name, PULLED_AT: f"{time.time():.3f}"}
        tagged = Descriptor(desc.media_type, desc.digest, desc.size, annotations, desc.platform)
        with self.locked():
            manifests = [m for m in self._read_index_raw()
                         if (m.get("annotations") or {}).get(mt.REF_NAME) != name]
            manifests.append(tagged.to_json())
            self._write_index(manifests)
        return tagged

    def untag(self, name: str) -> None:
        with self.locked():
            manifests = self._read_index_raw()
            kept = [m for m in manifests if (m.get("annotations") or {}).get(mt.REF_NAME) != name]
            if len(kept) == len(manifests):
                raise RefNotFound(name)
            self._write_index(kept)

    # -- accounting ----------------------------------------------------------------------

    def usage(self) -> Usage:
        blobs = blob_bytes = disk = ingest = 0
        for dirpath, _dirs, files in os.walk(self.root):
            in_blobs = Path(dirpath).parent == self.root / "blobs"
            in_ingest = Path(dirpath) == self.root / "ingest"
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                disk += st.st_blocks * 512
                if in_blobs:
                    blobs += 1
                    blob_bytes += st.st_size
                elif in_ingest:
                    ingest += st.st_size
        return Usage(blobs, blob_bytes, disk, ingest)

    def all_blobs(self) -> list[str]:
        out: list[str] = []
        base = self.root / "blobs"
        if not base.is_dir():
            return out
        for algo_dir in base.iterdir():
            if algo_dir.is_dir():
                out.extend(f"{algo_dir.name}:{p.name}" for p in algo_dir.iterdir())
        return out


async def _await_thread_future(fut: concurrent.futures.Future[FetchResult]) -> FetchResult:
    """Await a thread future without cancelling it when the awaiting task is cancelled."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[FetchResult] = loop.create_future()

    def _done(f: concurrent.futures.Future[FetchResult]) -> None:
        def _set() -> None:
            if waiter.done():
                return
            exc = f.exception()
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(f.result())
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_set)

    fut.add_done_callback(_done)
    return await waiter


def _atomic_write(path: Path, data: bytes) -> None:
    write_atomic(path, data, durable=True)
