"""Images: resolve and pull references, and the image rows that name them.

:class:`Images` owns the ``images``/``image_names`` rows. Every pull is the single flight
``PullKey(reference, platform)`` (:mod:`.flights`), and the same key names its entry on the
status board. A pull that is asked to build (``Pull`` without ``skip_build``, a cold
``Prepare``) starts the base's build as soon as the manifest is known (:class:`.builds.Builds`
streams the layers while they download).

Lifecycle of one pull::

    digest reference already recorded? ─▶ that record (no registry)
    else PullKey flight: resolve ─▶ on_manifest: start the streaming build
                         ─▶ download + verify ─▶ image row ─▶ open the gate (build imports)
    failure ─▶ abort the streaming build and wait for its cleanup, then raise

May import: ``kata_ipu.image`` (reference, platform, puller), the content store, the state
store, :mod:`.builds`, :mod:`.gc` (removing an image drops its unused bases).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from kata_ipu.content.store import ContentStore
from kata_ipu.daemon.builds import Builds
from kata_ipu.daemon.config import Config
from kata_ipu.daemon.flights import Flights, PullKey, PullStatus, StatusBoard
from kata_ipu.daemon.gc import Collector
from kata_ipu.daemon.metrics import Metrics
from kata_ipu.daemon.pipeline import PullGate
from kata_ipu.daemon.state import BaseRecord, BaseState, ImageRecord, StateStore, VolumeRecord
from kata_ipu.errors import FailedPrecondition, InvalidArgument, KataIpuError, NotFound
from kata_ipu.image.pull import Puller, PullPlan, PullProgress
from kata_ipu.image.reference import Reference, parse_reference
from kata_ipu.log import bind
from kata_ipu.oci.platform import Platform, host_platform, parse_platform

log = logging.getLogger("kata_ipu.daemon")

Described = tuple[ImageRecord, list[BaseRecord], int]
FSTYPES = ("ext4", "erofs")


class Images:
    """Pulls (one flight per reference and platform) and the image records."""

    def __init__(self, config: Config, state: StateStore, store: ContentStore,
                 puller: Puller, metrics: Metrics, builds: Builds, collector: Collector,
                 flights: Flights, board: StatusBoard) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.puller = puller
        self.metrics = metrics
        self.builds = builds
        self.collector = collector
        self.flights = flights
        self.board = board
        self.platform: Platform = (parse_platform(config.image.platform)
                                   if config.image.platform else host_platform())

    # -- arguments ----------------------------------------------------------------------------
    @staticmethod
    def reference(image: str) -> Reference:
        if not image:
            raise InvalidArgument("image reference is empty")
        return parse_reference(image)

    def fstype(self, fstype: str | None) -> str:
        fs = fstype or self.config.rootfs.fstype
        if fs not in FSTYPES:
            raise InvalidArgument(f"filesystem {fs!r} is not supported (ext4 or erofs)")
        return fs

    def pull_key(self, ref: Reference, platform: str) -> tuple[PullKey, Platform]:
        plat = parse_platform(platform) if platform else self.platform
        return PullKey(str(ref), str(plat)), plat

    # -- pulling ------------------------------------------------------------------------------
    async def pull(self, image: str, *, platform: str = "", fstype: str | None = None,
                   build: bool = True) -> ImageRecord:
        """Resolve and fetch ``image``, and (unless ``build`` is False) build its base,
        starting the build while the layers still download (see :mod:`.pipeline`)."""
        ref = self.reference(image)
        fs = self.fstype(fstype) if build else None
        known = await self._pinned(ref)
        # a digest names immutable content: what is recorded needs no registry
        record = known if known is not None else await self.pull_once(ref, platform, fs)
        if fs is not None:
            await self.builds.ensure(record.digest, fs, str(ref))
        return record

    async def _pinned(self, ref: Reference) -> ImageRecord | None:
        """The recorded image of a digest reference, if it is recorded under that name."""
        if ref.digest is None:
            return None
        named = await self.state.get_image(str(ref))
        if named is not None:
            return named
        same = await self.state.get_image(ref.digest)  # the same manifest under another name
        if same is None:
            return None
        await self.state.put_image(same, str(ref))
        return await self.state.get_image(same.digest)

    async def pull_once(self, ref: Reference, platform: str,
                        build_fs: str | None) -> ImageRecord:
        """The single pull flight of (reference, platform); with ``build_fs``, the base's
        build starts (as its own flight) as soon as the manifest is known."""
        key, plat = self.pull_key(ref, platform)
        return await self.flights.once(key, lambda: self._pull(key, ref, plat, build_fs))

    async def _pull(self, key: PullKey, ref: Reference, plat: Platform,
                    build_fs: str | None) -> ImageRecord:
        progress = PullProgress(str(ref))
        abort = threading.Event()
        gate = PullGate()
        build: asyncio.Future[BaseRecord] | None = None

        def on_manifest(plan: PullPlan) -> None:
            nonlocal build
            if build_fs is not None:
                build = self.builds.start_streaming(plan, build_fs, str(ref), abort, gate)

        status = PullStatus(str(ref), "", "downloading", progress, time.time())
        try:
            with self.board.showing(key, status), bind(image=str(ref)):
                pulled = await self.puller.pull(ref, platform=plat, progress=progress,
                                                name=str(ref), on_manifest=on_manifest)
        except BaseException as exc:
            # Stop the streaming build and wait for its cleanup, so that when this error
            # reaches the caller no partial image, mount or loop device is left.
            abort.set()
            gate.failed(exc)
            if build is not None:
                await asyncio.gather(asyncio.shield(build), return_exceptions=True)
            raise
        self.metrics.pull_bytes.inc(pulled.bytes_fetched)
        size = pulled.manifest.config.size + sum(layer.size for layer in pulled.manifest.layers)
        record = ImageRecord(pulled.descriptor.digest, pulled.manifest.config.digest, str(plat),
                             size, time.time())
        try:
            await self.state.put_image(record, str(ref))
        except BaseException as exc:
            abort.set()
            gate.failed(exc)
            raise
        gate.succeeded()
        log.info("image pulled", extra={"image": str(ref), "digest": record.digest,
                                        "bytes_fetched": pulled.bytes_fetched,
                                        "streaming_build": build is not None})
        got = await self.state.get_image(record.digest)
        assert got is not None
        return got

    def status(self, image: str = "") -> list[PullStatus]:
        return self.board.now(image)

    # -- records ------------------------------------------------------------------------------
    def image_layers(self, digest: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(compressed layer digests, diff_ids) of a pulled image, lowest layer first."""
        manifest = self.store.read_manifest(digest)
        config = self.store.read_config(manifest)
        return tuple(layer.digest for layer in manifest.layers), tuple(config.diff_ids)

    def layer_count(self, digest: str) -> int:
        return len(self.store.read_manifest(digest).layers)

    async def find_image(self, image: str) -> ImageRecord:
        if image.startswith("sha256:"):
            rec = await self.state.get_image(image)
        else:
            rec = await self.state.get_image(str(self.reference(image)))
        if rec is None:
            raise NotFound(f"image {image!r} not found")
        return rec

    async def list_images(self, prefix: str = "") -> list[Described]:
        """Images whose names start with ``prefix``, each with its READY bases and clones."""
        volumes = await self.state.list_volumes()
        return [await self._describe(img, volumes) for img in await self.state.list_images()
                if not prefix or any(n.startswith(prefix) for n in img.names)]

    async def describe_image(self, img: ImageRecord) -> Described:
        """One image with its READY bases and its number of live clones."""
        return await self._describe(img, await self.state.list_volumes())

    async def _describe(self, img: ImageRecord, volumes: list[VolumeRecord]) -> Described:
        bases = [b for b in await self.state.list_bases(img.digest)
                 if b.state is BaseState.READY]
        return img, bases, sum(1 for v in volumes if v.digest == img.digest)

    async def remove_image(self, image: str, *, force: bool = False) -> None:
        img = await self.find_image(image)
        volumes = [v for v in await self.state.list_volumes() if v.digest == img.digest]
        if volumes and not force:
            raise FailedPrecondition(
                f"image {image!r} has {len(volumes)} live clone(s) "
                f"({', '.join(v.container_id for v in volumes[:5])}); release them or force")
        for base in await self.state.list_bases(img.digest):
            if not any(v.base_id == base.id for v in volumes):
                await self.collector.drop_base(base.id)
        for name in img.names:
            with contextlib.suppress(KataIpuError):
                await asyncio.to_thread(self.store.untag, name)
        await self.state.delete_image(img.digest)
        log.info("image removed", extra={"image": image, "digest": img.digest})
