"""Pull an image from a registry into the content store (the async API the daemon uses).

``Puller`` owns one :class:`~kata_ipu.image.registry.RegistryClient` per registry (so tokens are
reused across pulls) and a content store. :meth:`Puller.pull`:

1. parses the reference and resolves it to a manifest or index (digest checked);
2. for an index, picks the platform (attestation manifests ignored) and fetches that manifest;
3. validates every layer media type *before* downloading anything (encrypted → refused);
4. takes a temporary lease on all descriptors, then fetches config and layers concurrently
   (bounded), each single-flight by digest in the store and verified while streaming;
5. writes manifest (and index) blobs, tags the image in ``index.json`` as ``str(reference)``,
   drops the temporary lease, and returns a :class:`PulledImage`.

Progress is visible at any time through the :class:`PullProgress` passed in (or
``puller.progress(ref)``): one :class:`~kata_ipu.content.status.BlobStatus` per blob.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kata_ipu.content.status import BlobProgress, BlobStatus
from kata_ipu.content.store import ContentStore
from kata_ipu.errors import NotFound
from kata_ipu.image.credentials import CredentialChain, Credentials, default_credentials
from kata_ipu.image.hosts import hosts_for
from kata_ipu.image.reference import Reference, parse_reference
from kata_ipu.image.registry import RegistryClient, RetryPolicy
from kata_ipu.image.transport import HttpTransport, Timeouts
from kata_ipu.log import bind
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.digest import digest_bytes
from kata_ipu.oci.manifest import (
    Descriptor,
    ImageConfig,
    Index,
    InvalidManifest,
    Manifest,
    parse_any,
    parse_config,
    parse_manifest,
    to_oci_manifest,
)
from kata_ipu.oci.platform import Platform, host_platform, match_rank

log = logging.getLogger("kata_ipu.image")

REGISTRY_DIGEST = "io.katacontainers.ipu.registry-digest"
"""index.json annotation on images converted from Docker schema2: the registry's digest."""


class PlatformNotFound(NotFound):
    def __init__(self, where: str, want: Platform, have: Sequence[str]) -> None:
        super().__init__(f"{where} has no manifest for platform {want} "
                         f"(available: {', '.join(have) or 'none'})")
        self.platform = want


@dataclass
class PullProgress:
    """Live progress of one pull: per-blob status objects plus the overall phase
    (``resolving`` → ``fetching`` → ``committing`` → ``done`` | ``failed``)."""

    reference: str
    phase: str = "resolving"
    blobs: dict[str, BlobStatus] = field(default_factory=dict)

    def snapshot(self) -> tuple[BlobProgress, ...]:
        return tuple(s.snapshot() for s in list(self.blobs.values()))

    @property
    def total_bytes(self) -> int:
        return sum(s.total for s in list(self.blobs.values()))

    @property
    def done_bytes(self) -> int:
        return sum(s.offset for s in list(self.blobs.values()))


@dataclass(frozen=True, slots=True)
class PulledImage:
    reference: Reference
    name: str
    """Name tagged in the store's index.json (``org.opencontainers.image.ref.name``)."""
    descriptor: Descriptor
    """The image manifest as stored and tagged (platform-specific; always OCI media types)."""
    manifest: Manifest
    config: ImageConfig
    registry_digest: str
    """Digest of the manifest as the registry serves it (differs from ``descriptor.digest``
    only for Docker schema2 images, which are tagged in their OCI form)."""
    index_digest: str | None
    bytes_fetched: int
    """Bytes downloaded by this pull (0 for blobs already present or shared)."""
    blobs: tuple[BlobProgress, ...]


@dataclass(frozen=True, slots=True)
class PullPlan:
    """What a pull is about to fetch, handed to ``on_manifest`` before any blob is downloaded
    (so a consumer can start working on the blobs while they arrive)."""

    digest: str
    """Digest of the manifest as it will be stored and tagged (the OCI form for Docker
    schema2 manifests): the image's identity in the store."""
    manifest_data: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    blob_tail: Callable[[Descriptor, int], bytes | None]
    """Blocking: the last n bytes of a blob from the registry (a hint; None if unavailable)."""


def select_platform(index: Index, want: Platform, where: str) -> Descriptor:
    """The best manifest of ``index`` for ``want``."""
    best: tuple[int, Descriptor] | None = None
    have: list[str] = []
    for desc in index.manifests:
        if desc.is_attestation or desc.media_type not in mt.MANIFEST_TYPES | mt.INDEX_TYPES:
            continue
        if desc.platform is None:
            continue
        have.append(str(desc.platform))
        rank = match_rank(want, desc.platform)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, desc)
    if best is None:
        raise PlatformNotFound(where, want, have)
    return best[1]


class Puller:
    """Pulls images into one store. See the module docstring for the lifecycle of a pull."""

    def __init__(
        self,
        store: ContentStore,
        *,
        hosts_dir: str | os.PathLike[str] | None = None,
        insecure_registries: Sequence[str] = (),
        credentials: Mapping[str, Credentials] | None = None,
        credential_chain: CredentialChain | None = None,
        platform: Platform | None = None,
        max_concurrent_downloads: int = 3,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        transport: HttpTransport | None = None,
    ) -> None:
        self.store = store
        self.hosts_dir = Path(hosts_dir) if hosts_dir is not None else None
        self.insecure = tuple(insecure_registries)
        self.credentials = credential_chain or default_credentials(credentials)
        self.platform = platform or host_platform()
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self.transport = transport or HttpTransport()
        self._slots = max_concurrent_downloads
        self._clients: dict[str, RegistryClient] = {}

    def client(self, registry: str) -> RegistryClient:
        client = self._clients.get(registry)
        if client is None:
            client = RegistryClient(
                registry, hosts_for(registry, self.hosts_dir, insecure=self.insecure),
                credentials=self.credentials, transport=self.transport, retry=self.retry,
                timeouts=self.timeouts)
            self._clients[registry] = client
        return client

    async def pull(self, ref: str | Reference, *, platform: Platform | None = None,
                   progress: PullProgress | None = None,
                   name: str | None = None,
                   on_manifest: Callable[[PullPlan], None] | None = None) -> PulledImage:
        """Pull ``ref``. ``on_manifest`` (called in the event loop, once the manifest is
        resolved and before blobs are fetched) lets a caller consume blobs as they arrive."""
        reference = parse_reference(ref) if isinstance(ref, str) else ref
        progress = progress or PullProgress(str(reference))
        with bind(image_ref=str(reference)):
            try:
                return await self._pull(reference, platform or self.platform, progress, name,
                                        on_manifest)
            except BaseException:
                progress.phase = "failed"
                raise

    async def _pull(self, ref: Reference, want: Platform, progress: PullProgress,
                    name: str | None,
                    on_manifest: Callable[[PullPlan], None] | None = None) -> PulledImage:
        client = self.client(ref.registry)
        index_desc, index_data, manifest_desc, manifest_data = await _resolve_manifest(
            client, ref, want)
        manifest = parse_manifest(manifest_data, media_type=manifest_desc.media_type,
                                  where=f"{ref} ({manifest_desc.digest})")
        blobs = (manifest.config, *manifest.layers)
        for d in manifest.layers:
            if d.urls:
                log.info("foreign layer: pulling from the registry, ignoring urls",
                         extra={"digest": d.digest})
        lease_id = f"pull-{uuid.uuid4().hex}"
        roots = [manifest_desc, *blobs] + ([index_desc] if index_desc else [])
        oci_data = b""
        if manifest.media_type == mt.DOCKER_MANIFEST:
            # skopeo/umoci only read OCI manifests from a layout: tag the OCI form,
            # keep the registry's bytes too (they are what the digest names).
            oci_data = to_oci_manifest(manifest)
        self.store.leases.create(lease_id, roots, labels={"ref": str(ref)}, temporary=True)
        try:
            progress.phase = "fetching"
            if on_manifest is not None:
                repository = ref.repository
                on_manifest(PullPlan(
                    digest_bytes(oci_data) if oci_data else manifest_desc.digest,
                    oci_data or manifest_data, manifest.config, tuple(manifest.layers),
                    lambda d, n: client.fetch_blob_tail(repository, d, n)))
            fetched = await self._fetch_all(client, ref.repository, blobs, progress)
            config = parse_config(self.store.read_blob(manifest.config.digest),
                                  where=f"config {manifest.config.digest} of {ref}")
            if len(config.diff_ids) != len(manifest.layers):
                raise InvalidManifest(
                    f"{ref} ({manifest_desc.digest})",
                    f"{len(manifest.layers)} layers but config has {len(config.diff_ids)} "
                    "diff_ids")
            progress.phase = "committing"
            self.store.write_blob(manifest_data, manifest_desc.media_type)
            if index_desc is not None:
                self.store.write_blob(index_data, index_desc.media_type)
            stored_desc, stored = manifest_desc, manifest
            annotations: dict[str, str] = {}
            if oci_data:
                oci_desc = Descriptor(mt.OCI_MANIFEST, digest_bytes(oci_data), len(oci_data))
                self.store.leases.add(lease_id, oci_desc)
                stored_desc = self.store.write_blob(oci_data, mt.OCI_MANIFEST)
                stored = parse_manifest(oci_data, where=f"OCI form of {manifest_desc.digest}")
                annotations[REGISTRY_DIGEST] = manifest_desc.digest
            image_name = name or str(ref)
            self.store.tag(image_name, Descriptor(stored_desc.media_type, stored_desc.digest,
                                                  stored_desc.size, annotations,
                                                  platform=config.platform))
        finally:
            self.store.leases.delete(lease_id)
        progress.phase = "done"
        log.info("pulled", extra={"digest": stored_desc.digest, "bytes_fetched": fetched})
        return PulledImage(ref, image_name, stored_desc, stored, config, manifest_desc.digest,
                           index_desc.digest if index_desc else None, fetched,
                           progress.snapshot())

    async def _fetch_all(self, client: RegistryClient, repository: str,
                         blobs: Sequence[Descriptor], progress: PullProgress) -> int:
        sem = asyncio.Semaphore(self._slots)
        unique = list({d.digest: d for d in blobs}.values())

        async def one(desc: Descriptor) -> int:
            status = progress.blobs.setdefault(desc.digest, self.store.status_for(desc))
            async with sem:
                result = await self.store.fetch(
                    desc, lambda w: client.fetch_blob(repository, desc, w), status)
            return result.bytes_fetched

        tasks = [asyncio.create_task(one(d)) for d in unique]
        try:
            return sum(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def _resolve_manifest(client: RegistryClient, ref: Reference, want: Platform
                            ) -> tuple[Descriptor | None, bytes, Descriptor, bytes]:
    """``(index descriptor or None, index bytes, manifest descriptor, manifest bytes)`` of
    ``ref``: the registry's answer, through at most two levels of index by platform."""
    resolved = await asyncio.to_thread(client.resolve, ref)
    top = resolved.descriptor
    node = parse_any(resolved.data, media_type=top.media_type, where=f"{ref} ({top.digest})")
    index_desc: Descriptor | None = None
    index_data = b""
    manifest_desc, manifest_data = top, resolved.data
    depth = 0
    while isinstance(node, Index):
        depth += 1
        if depth > 2:
            raise InvalidManifest(str(ref), "nested indexes deeper than 2")
        index_desc, index_data = manifest_desc, manifest_data
        chosen = select_platform(node, want, f"{ref} ({manifest_desc.digest})")
        manifest_data = await asyncio.to_thread(client.fetch_manifest, ref.repository, chosen)
        manifest_desc = Descriptor(chosen.media_type, chosen.digest, chosen.size,
                                   platform=chosen.platform)
        node = parse_any(manifest_data, media_type=chosen.media_type,
                         where=f"{ref} ({chosen.digest})")
    return index_desc, index_data, manifest_desc, manifest_data


async def pull(ref: str, store: ContentStore, **kwargs: object) -> PulledImage:
    """One-shot convenience: ``await pull("127.0.0.1:5000/busybox", store)``."""
    puller = Puller(store, **kwargs)  # type: ignore[arg-type]
    return await puller.pull(ref)
