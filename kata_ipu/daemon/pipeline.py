"""Build a base while its image is still being pulled (the cold-prepare pipeline).

Without it a cold prepare is: download every blob (hash, write, fsync) → read every blob back
(hash again, inflate, hash the tar) → apply. With it the builder starts as soon as the pull
knows the manifest: it reads each layer from the content store's ingest while the bytes arrive
(:meth:`~kata_ipu.content.store.ContentStore.follow`), layers download concurrently and are
applied in order, and the download of layer n+1 overlaps the apply of layer n.

Correctness rests on two rules:

* The builder verifies what it reads exactly as for a finished store (blob digest and size,
  diff_id), and the base is only imported once the pull itself committed every blob
  (:class:`PullGate`): a blob that fails its check fails the pull with the usual
  ``DigestMismatch``/``SizeMismatch``, the build is aborted and cleaned up (no partial image,
  no mount, no loop device) and nothing unverified ever reaches ``blobs/`` or the pool.
* Every wait on a growing blob ends when the pull fails (:class:`threading.Event` ``abort``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from typing import BinaryIO, cast

from kata_ipu.content.follow import BlobFollower
from kata_ipu.content.store import ContentStore
from kata_ipu.errors import Aborted, InvalidArgument
from kata_ipu.image.pull import PullPlan
from kata_ipu.oci.manifest import Descriptor
from kata_ipu.rootfs.errors import BlobDigestMismatch, BlobNotFound
from kata_ipu.rootfs.oci import ImageConfig, Layer, Manifest
from kata_ipu.rootfs.sizehint import GZIP_TAIL, ZSTD_HEAD, from_gzip_tail, from_zstd_head

MAX_CONFIG = 4 << 20


class PullGate:
    """How a streaming build learns whether the pull it reads from committed."""

    def __init__(self) -> None:
        self._done = asyncio.Event()
        self.error: BaseException | None = None

    def succeeded(self) -> None:
        self._done.set()

    def failed(self, exc: BaseException) -> None:
        self.error = exc
        self._done.set()

    async def wait(self) -> None:
        """Return once the pull committed; raise :class:`~kata_ipu.errors.Aborted` if it
        failed (the pull's own error is what the caller reports)."""
        await self._done.wait()
        if self.error is not None:
            raise Aborted(f"the pull this build read from failed: {self.error}") \
                from self.error


class StreamingSource:
    """The builder's :class:`~kata_ipu.rootfs.oci.ImageSource` over a pull in flight (with
    :class:`~kata_ipu.rootfs.oci.SizeHints`). Blocking; used from the builder's thread."""

    def __init__(self, store: ContentStore, plan: PullPlan, abort: threading.Event) -> None:
        self.store = store
        self.plan = plan
        self.abort = abort
        self._blobs: dict[str, Descriptor] = {d.digest: d for d in (plan.config, *plan.layers)}

    def _follow(self, digest: str) -> BlobFollower:
        desc = self._blobs.get(digest)
        if desc is None:
            raise BlobNotFound(digest)
        return self.store.follow(desc, self.abort)

    def manifest(self, digest: str) -> Manifest:
        if digest != self.plan.digest:
            raise InvalidArgument(f"this pull fetches {self.plan.digest}, not {digest}")
        return Manifest.parse(digest, self.plan.manifest_data)

    def config(self, manifest: Manifest) -> ImageConfig:
        cfg = manifest.config
        with self._follow(cfg.digest) as f:
            data = _read_all(f, MAX_CONFIG + 1)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != cfg.digest or len(data) != cfg.size:
            raise BlobDigestMismatch(cfg.digest, actual, cfg.size, len(data))
        return ImageConfig.parse(cfg.digest, data)

    def open_blob(self, digest: str) -> BinaryIO:
        # A BlobFollower has the read/close/context-manager subset of BinaryIO the builder
        # uses (VerifiedReader only calls read()).
        return cast(BinaryIO, self._follow(digest))

    def size_hint(self, layer: Layer) -> int | None:
        size = layer.descriptor.size
        if layer.compression == "none":
            return size
        with self._follow(layer.digest) as f:
            if layer.compression == "zstd":
                return from_zstd_head(_read_all(f, ZSTD_HEAD), size)
            if layer.compression != "gzip":
                return None
            # Wait for the download's first bytes, so the ranged request below never competes
            # with the download for the registry's first answer (retries, fault injection).
            while not f.complete() and f.available() == 0:
                if self.abort.wait(0.001):
                    return None
            if f.complete():
                return from_gzip_tail(f.pread_tail(GZIP_TAIL), size)
        tail = self.plan.blob_tail(self._blobs[layer.digest], GZIP_TAIL)
        return None if tail is None else from_gzip_tail(tail, size)


def _read_all(f: BlobFollower, limit: int) -> bytes:
    buf = io.BytesIO()
    while buf.tell() < limit:
        chunk = f.read(limit - buf.tell())
        if not chunk:
            break
        buf.write(chunk)
    return buf.getvalue()
