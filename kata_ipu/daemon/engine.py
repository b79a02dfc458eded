"""The IPU's control path: pull → build the base once → clone → export, and back.

:class:`Engine` wires the content store and puller (``kata_ipu.image``/``content``), the
rootfs builder (``kata_ipu.rootfs``) and the block target (``kata_ipu.block``) together, and
records intent in the state database before every change so that a crash at any point is
repaired by :meth:`Engine.recover` on the next start.

Lifecycle of one container's rootfs::

    prepare(id, image) ─▶ image known?  no ─▶ pull (single-flight per reference)
                          base READY?   no ─▶ build + import_base (single-flight per base id)
                          volume row CREATING ─▶ clone + export ─▶ volume row READY ─▶ device
    release(id)        ─▶ volume row RELEASING ─▶ unexport (hot-remove) ─▶ destroy ─▶ row gone

Every call is idempotent by its key: ``prepare`` of a prepared id returns the same device (or
refuses if the id was prepared from another image), ``release`` of an unknown id succeeds.
Calls on one container id are serialized; different ids run concurrently. Blocking work
(building, cloning, ioctl-based exports) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from kata_ipu.block import ExportKind, fsutil, loop
from kata_ipu.block.interface import BlockTarget
from kata_ipu.block.pool import create_pool
from kata_ipu.content.follow import IngestRestarted
from kata_ipu.content.gc import collect
from kata_ipu.content.store import ContentStore
from kata_ipu.daemon import warmpool
from kata_ipu.daemon.config import Config
from kata_ipu.daemon.metrics import Metrics
from kata_ipu.daemon.pipeline import PullGate, StreamingSource
from kata_ipu.daemon.state import (
    BaseRecord,
    BaseState,
    ImageRecord,
    StateStore,
    VolumeRecord,
    VolumeState,
)
from kata_ipu.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KataIpuError,
    NotFound,
    ResourceExhausted,
)
from kata_ipu.executor import DEFAULT, CommandFailed
from kata_ipu.image.credentials import CredentialChain, DockerConfigFile, default_credentials
from kata_ipu.image.platform import Platform, host_platform, parse_platform
from kata_ipu.image.pull import Puller, PullPlan, PullProgress
from kata_ipu.image.reference import Reference, parse_reference
from kata_ipu.log import bind
from kata_ipu.rootfs.builder import BuildConfig, RootfsBuilder
from kata_ipu.rootfs.oci import ImageSource, OciLayoutSource
from kata_ipu.rootfs.writers import SizePolicy

log = logging.getLogger("kata_ipu.daemon")

T = TypeVar("T")

CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_container_id(container_id: str) -> str:
    if not container_id:
        raise InvalidArgument("container_id is empty")
    if not CONTAINER_ID.match(container_id):
        raise InvalidArgument(
            f"container_id {container_id!r} is invalid: use 1-128 characters of "
            "[A-Za-z0-9_.-], starting with a letter or digit")
    if container_id.startswith(warmpool.PREFIX):
        raise InvalidArgument(f"container_id {container_id!r} is invalid: the prefix "
                              f"{warmpool.PREFIX!r} is reserved for the warm pool's spares")
    return container_id


CRASH_ENV = "KATA_IPU_CRASH_AT"


def crash_point(stage: str) -> None:
    """Fault injection for the crash tests: ``KATA_IPU_CRASH_AT=<stage>`` makes the daemon
    SIGKILL itself at that point (``build``, ``clone``, ``export``), leaving exactly the
    half-done state a power cut would. Costs one environment lookup otherwise."""
    if os.environ.get(CRASH_ENV) == stage:
        log.warning("crash point %s: killing myself", stage)
        os.kill(os.getpid(), signal.SIGKILL)


def _out_of_space(exc: BaseException) -> bool:
    """ENOSPC anywhere in the cause chain, or a tool that said so on stderr."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if isinstance(seen, ResourceExhausted):
            return False  # already typed: keep it
        if isinstance(seen, CommandFailed) and b"No space left on device" in (
                seen.result.stderr + seen.result.stdout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def base_id_for(digest: str, fstype: str, layers: int = 0) -> str:
    """One base per (manifest digest, filesystem): ``<hex[:32]>-<fstype>``; a base of the
    image's first ``layers`` layers only (a lower snapshot of containerd's chain) is
    ``<hex[:32]>-<fstype>-l<layers>``."""
    base = f"{digest.partition(':')[2][:32]}-{fstype}"
    return f"{base}-l{layers}" if layers else base


@dataclass(frozen=True)
class PullStatus:
    """One pull or build in flight, for ImageService.Status."""

    image: str
    digest: str
    phase: str
    progress: PullProgress | None
    started_at: float
    error: str = ""


@dataclass(frozen=True)
class Prepared:
    volume: VolumeRecord
    cold: bool


class Engine:
    """The daemon's core. Create with :meth:`open`, stop with :meth:`close`."""

    def __init__(self, config: Config, state: StateStore, store: ContentStore, puller: Puller,
                 target: BlockTarget, metrics: Metrics) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.puller = puller
        self.target = target
        self.metrics = metrics
        self.platform: Platform = (parse_platform(config.image.platform)
                                   if config.image.platform else host_platform())
        self._flights: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._locks: dict[str, list[Any]] = {}  # id -> [lock, holders + waiters]
        self._status: dict[str, PullStatus] = {}
        # Bases are built inside the pool's filesystem, so import_base's copy_file_range
        # becomes a reflink (XFS) instead of a byte copy.
        self.build_dir = target.pool.data_dir / "build"
        self.warm = warmpool.WarmPool(target, config.rootfs.warm_clones,
                                      on_change=metrics.spares.set)

    @classmethod
    async def open(cls, config: Config, metrics: Metrics) -> Engine:
        config.root.mkdir(parents=True, exist_ok=True)
        state = await StateStore.open(config.state_db)
        try:
            store = await asyncio.to_thread(ContentStore.open, config.content_dir)
            chain = default_credentials()
            if config.image.docker_config:  # the configured file first, then the usual ones
                chain = CredentialChain([DockerConfigFile(config.image.docker_config),
                                         *chain.sources])
            puller = Puller(store, hosts_dir=config.image.hosts_dir,
                            insecure_registries=config.image.insecure_registries,
                            credential_chain=chain)
            target = await asyncio.to_thread(
                create_pool, config.root / "block", backend=config.block.backend,
                size=config.block.pool_size)
        except BaseException:
            await state.close()
            raise
        return cls(config, state, store, puller, target, metrics)

    async def close(self) -> None:
        await self.warm.close()
        with contextlib.suppress(OSError):
            self.build_dir.rmdir()  # only when empty: recovery owns leftovers
        await asyncio.to_thread(self.target.close)
        await asyncio.to_thread(self.store.close)
        await self.state.close()

    # ------------------------------------------------------------------ helpers
    async def _once(self, key: tuple[str, ...], factory: Callable[[], Awaitable[T]]) -> T:
        """Single flight: concurrent callers with one key share one execution."""
        return await asyncio.shield(self._flight(key, factory))

    def _flight(self, key: tuple[str, ...], factory: Callable[[], Awaitable[T]]
                ) -> asyncio.Future[T]:
        """The running execution for ``key``, started from ``factory`` if there is none."""
        fut = self._flights.get(key)
        if fut is None:
            fut = asyncio.ensure_future(factory())
            self._flights[key] = fut
            fut.add_done_callback(lambda _f: self._flights.pop(key, None))
        return fut

    @contextlib.asynccontextmanager
    async def _locked(self, container_id: str) -> AsyncIterator[None]:
        """Serialize calls on one container id; the lock lives while someone holds or waits."""
        entry = self._locks.get(container_id)
        if entry is None:
            entry = self._locks[container_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._locks.pop(container_id, None)

    def _reference(self, image: str) -> Reference:
        if not image:
            raise InvalidArgument("image reference is empty")
        return parse_reference(image)

    def _fstype(self, fstype: str | None) -> str:
        fs = fstype or self.config.rootfs.fstype
        if fs not in ("ext4", "erofs"):
            raise InvalidArgument(f"filesystem {fs!r} is not supported (ext4 or erofs)")
        return fs

    # ------------------------------------------------------------------ images
    async def pull(self, image: str, *, platform: str = "", fstype: str | None = None,
                   build: bool = True) -> ImageRecord:
        """Resolve and fetch ``image``, and (unless ``build`` is False) build its base,
        starting the build while the layers still download (see :mod:`.pipeline`)."""
        ref = self._reference(image)
        fs = self._fstype(fstype) if build else None
        known = await self._pinned(ref)
        if known is not None:
            # a digest names immutable content: what is recorded needs no registry
            record = known
        else:
            record = await self._pull_once(ref, platform, fs)
        if fs is not None:
            await self._ensure_base(record.digest, fs, str(ref))
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

    def image_layers(self, digest: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(compressed layer digests, diff_ids) of a pulled image, lowest layer first."""
        manifest = self.store.read_manifest(digest)
        config = self.store.read_config(manifest)
        return tuple(layer.digest for layer in manifest.layers), tuple(config.diff_ids)

    def _layer_count(self, digest: str) -> int:
        return len(self.store.read_manifest(digest).layers)

    async def _pull_once(self, ref: Reference, platform: str,
                         build_fs: str | None) -> ImageRecord:
        """The single pull flight of (reference, platform); see :meth:`_pull`."""
        plat = parse_platform(platform) if platform else self.platform
        return await self._once(("pull", str(ref), str(plat)),
                                lambda: self._pull(ref, plat, build_fs))

    async def _pull(self, ref: Reference, plat: Platform,
                    build_fs: str | None = None) -> ImageRecord:
        """Pull; with ``build_fs``, also start building the base (as the ``("build", id)``
        flight) as soon as the manifest is known, reading the layers as they arrive."""
        progress = PullProgress(str(ref))
        key = f"pull:{ref}"
        self._status[key] = PullStatus(str(ref), "", "downloading", progress, time.time())
        abort = threading.Event()
        gate = PullGate()
        build: asyncio.Future[BaseRecord] | None = None

        def on_manifest(plan: PullPlan) -> None:
            nonlocal build
            if build_fs is None:
                return
            base_id = base_id_for(plan.digest, build_fs)
            if ("build", base_id) in self._flights:
                return  # already being built (from the store, or by another pull)
            source = StreamingSource(self.store, plan, abort)
            build = self._flight(("build", base_id), lambda: self._build(
                plan.digest, build_fs, base_id, str(ref), source=source, gate=gate))

        try:
            with bind(image=str(ref)):
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
        finally:
            self._status.pop(key, None)
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

    async def _ensure_base(self, digest: str, fstype: str, name: str,
                           layers: int = 0) -> BaseRecord:
        base_id = base_id_for(digest, fstype, layers)
        rec = await self.state.get_base(base_id)
        if rec is not None and rec.state is BaseState.READY:
            return rec
        try:
            return await self._once(("build", base_id), lambda: self._build(
                digest, fstype, base_id, name, layers=layers))
        except IngestRestarted:
            # We joined a streaming build whose download started over (its bytes can no
            # longer be trusted); the pull finished, so build once more from the store.
            log.info("streaming build lost its source; building from the store",
                     extra={"base": base_id})
            return await self._once(("build", base_id), lambda: self._build(
                digest, fstype, base_id, name, layers=layers))

    async def _build(self, digest: str, fstype: str, base_id: str, name: str, *,
                     source: ImageSource | None = None, gate: PullGate | None = None,
                     layers: int = 0) -> BaseRecord:
        """Build and import the base (of the first ``layers`` layers only, if not 0). By
        default from the content store; a streaming build reads ``source`` while the pull
        runs and imports only after ``gate`` opens."""
        if gate is not None:
            rec = await self.state.get_base(base_id)
            if rec is not None and rec.state is BaseState.READY:
                return rec
        key = f"build:{base_id}"
        self._status[key] = PullStatus(name, digest, "building", None, time.time())
        await self.state.put_base(BaseRecord(base_id, digest, fstype, BaseState.BUILDING,
                                             layers=layers))
        self.build_dir.mkdir(parents=True, exist_ok=True)
        out = self.build_dir / f"{base_id}.img"
        rc = self.config.rootfs
        builder = RootfsBuilder(
            source or OciLayoutSource(self.config.content_dir),
            BuildConfig(fs_type="erofs" if fstype == "erofs" else "ext4",
                        size=SizePolicy(headroom_ratio=rc.headroom, min_size=rc.min_size,
                                        max_size=rc.max_size)))
        start = time.monotonic()
        try:
            with bind(image=name, digest=digest):
                result = await builder.abuild(digest, out, layers=layers)
                if gate is not None:
                    await gate.wait()  # every blob verified and committed by the pull
                built = time.monotonic()
                crash_point("build")
                # The base is named by what it was built from, so importing it does not have
                # to hash the whole image (a rebuild under this id only follows a rollback).
                base = await asyncio.to_thread(self.target.import_base, result.image, base_id,
                                               content_id=f"build:{digest}:{fstype}"
                                               + (f":{layers}" if layers else ""))
        except BaseException as exc:
            self.metrics.builds.labels("error").inc()
            await self.state.delete_base(base_id)
            if _out_of_space(exc):
                raise ResourceExhausted(
                    f"block pool {self.target.pool.root} is full while building the base of "
                    f"{name}: release volumes, remove images or run gc") from exc
            raise
        finally:
            self._status.pop(key, None)
            for leftover in self.build_dir.glob(f"{base_id}.img*"):
                leftover.unlink(missing_ok=True)
        seconds = time.monotonic() - start
        rec = BaseRecord(base_id, digest, fstype, BaseState.READY, base.size, time.time(),
                         seconds, layers)
        await self.state.put_base(rec)
        self.metrics.builds.labels("ok").inc()
        log.info("base built", extra={"digest": digest, "base": base_id, "layers": layers,
                                      "seconds": round(seconds, 3),
                                      "build_seconds": round(built - start, 3),
                                      "import_seconds": round(time.monotonic() - built, 3),
                                      "stages": result.record.get("stages", {})})
        await self.evict_bases(keep={base_id})
        return rec

    async def find_image(self, image: str) -> ImageRecord:
        if image.startswith("sha256:"):
            rec = await self.state.get_image(image)
        else:
            rec = await self.state.get_image(str(self._reference(image)))
        if rec is None:
            raise NotFound(f"image {image!r} not found")
        return rec

    async def list_images(self, prefix: str = "") -> list[tuple[ImageRecord, list[BaseRecord],
                                                                int]]:
        """Images whose names start with ``prefix``, each with its READY bases and clones."""
        volumes = await self.state.list_volumes()
        return [await self._describe(img, volumes) for img in await self.state.list_images()
                if not prefix or any(n.startswith(prefix) for n in img.names)]

    async def describe_image(self, img: ImageRecord
                             ) -> tuple[ImageRecord, list[BaseRecord], int]:
        """One image with its READY bases and its number of live clones."""
        return await self._describe(img, await self.state.list_volumes())

    async def _describe(self, img: ImageRecord, volumes: list[VolumeRecord]
                        ) -> tuple[ImageRecord, list[BaseRecord], int]:
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
                await self._drop_base(base.id)
                await self.state.delete_base(base.id)
        for name in img.names:
            with contextlib.suppress(KataIpuError):
                await asyncio.to_thread(self.store.untag, name)
        await self.state.delete_image(img.digest)
        log.info("image removed", extra={"image": image, "digest": img.digest})

    async def _drop_base(self, base_id: str) -> None:
        """Destroy a base, its idle spares first (they are clones of it)."""
        await self.warm.drop(base_id)
        await asyncio.to_thread(self._destroy_base_quiet, base_id)

    def _destroy_base_quiet(self, base_id: str) -> None:
        try:
            self.target.destroy_base(base_id)
        except NotFound:
            pass

    def status(self, image: str = "") -> list[PullStatus]:
        return [s for s in self._status.values() if not image or s.image.startswith(image)]

    # ------------------------------------------------------------------ rootfs
    async def prepare(self, container_id: str, image: str, *, export: ExportKind,
                      fstype: str | None = None, platform: str = "",
                      annotations: dict[str, str] | None = None, layers: int = 0) -> Prepared:
        """``layers``: clone the base of the image's first N layers only (0: all of them)."""
        check_container_id(container_id)
        ref = self._reference(image)
        fs = self._fstype(fstype)
        if layers < 0:
            raise InvalidArgument(f"layers {layers} is negative")
        with bind(container_id=container_id, image=str(ref)):
            async with self._locked(container_id):
                view = await self.state.prepare_view(container_id, str(ref),
                                                     lambda digest: base_id_for(digest, fs))
                cold = False
                t0 = time.monotonic()
                timings: dict[str, float] = {}
                img, base = view.image, view.base
                if img is None and view.volume is None:
                    cold = True
                    # Starts the base's build while the layers download; the base check
                    # below joins that build.
                    img = await self._pull_once(ref, platform, fs)
                    timings["pull_seconds"] = round(time.monotonic() - t0, 3)
                    base = await self.state.get_base(base_id_for(img.digest, fs))
                if layers and img is not None:
                    count = await asyncio.to_thread(self._layer_count, img.digest)
                    if layers > count:
                        raise InvalidArgument(f"image {ref} has {count} layers, not {layers}")
                    if layers < count:
                        base = await self.state.get_base(base_id_for(img.digest, fs, layers))
                    else:
                        layers = 0  # all of them: the image's own base
                if view.volume is not None:
                    return await self._existing(view.volume, ref, export, layers)
                assert img is not None
                if base is None or base.state is not BaseState.READY:
                    cold = True
                    t1 = time.monotonic()
                    base = await self._ensure_base(img.digest, fs, str(ref), layers)
                    timings["base_seconds"] = round(time.monotonic() - t1, 3)
                t2 = time.monotonic()
                spare = self.warm.take(base.id, export)
                if spare is not None:  # already cloned and exported: only recorded now
                    vol = VolumeRecord(container_id, spare.volume_id, base.id, str(ref),
                                       img.digest, VolumeState.READY, export.name,
                                       spare.device.to_json(), dict(annotations or {}),
                                       time.time())
                    try:
                        await self.state.put_volume(vol)
                    except BaseException:
                        await asyncio.to_thread(self.target.retire, spare.volume_id)
                        raise
                    device = vol.device
                else:
                    vol = VolumeRecord(container_id, container_id, base.id, str(ref),
                                       img.digest, VolumeState.CREATING, export.name, {},
                                       dict(annotations or {}), time.time())
                    await self.state.put_volume(vol)
                    try:
                        device = await asyncio.to_thread(self._clone_export, base.id,
                                                         container_id, export)
                    except BaseException:
                        await asyncio.to_thread(self._destroy_quiet, container_id)
                        await self.state.delete_volume(container_id)
                        raise
                    vol = dataclasses.replace(vol, state=VolumeState.READY, device=device)
                    await self.state.put_volume(vol)
                self.warm.wanted(base.id, export)
                self.metrics.volumes.inc()
                timings["clone_export_seconds"] = round(time.monotonic() - t2, 3)
                timings["seconds"] = round(time.monotonic() - t0, 3)
                log.info("rootfs prepared", extra={"digest": img.digest, "cold": cold,
                                                   "device": device.get("path"),
                                                   "spare": spare is not None, **timings})
                return Prepared(vol, cold)

    async def _existing(self, vol: VolumeRecord, ref: Reference, export: ExportKind,
                        layers: int) -> Prepared:
        if vol.image != str(ref):
            img = await self.state.get_image(str(ref))
            if img is None or img.digest != vol.digest:
                raise AlreadyExists(f"container {vol.container_id!r} is already prepared "
                                    f"with image {vol.image!r}")
        held = re.search(r"-l(\d+)$", vol.base_id)
        if (int(held.group(1)) if held else 0) != layers:
            raise AlreadyExists(f"container {vol.container_id!r} is already prepared from "
                                f"another base ({vol.base_id}) of image {vol.image!r}")
        if vol.state is not VolumeState.READY:
            raise FailedPrecondition(f"container {vol.container_id!r} is {vol.state.value}")
        if vol.export_kind != export.name:
            raise AlreadyExists(f"container {vol.container_id!r} is already exported as "
                                f"{vol.export_kind}, not {export.name}")
        return Prepared(vol, False)

    def _clone_export(self, base_id: str, volume_id: str, kind: ExportKind) -> dict[str, Any]:
        self.target.clone(base_id, volume_id)
        crash_point("clone")
        device = self.target.export(volume_id, kind)
        crash_point("export")
        return device.to_json()

    def _destroy_quiet(self, volume_id: str) -> None:
        try:
            self.target.destroy(volume_id, missing_ok=True)
        except KataIpuError:
            log.exception("cleanup of volume %s failed", volume_id)

    async def release(self, container_id: str) -> bool:
        """Unexport then destroy; True if something was released. Idempotent."""
        check_container_id(container_id)
        with bind(container_id=container_id):
            async with self._locked(container_id):
                vol = await self.state.get_volume(container_id)
                if vol is None:
                    # Nothing recorded; still make sure no orphan is left in the pool.
                    await asyncio.to_thread(self.target.destroy, container_id, missing_ok=True)
                    return False
                await self.state.put_volume(dataclasses.replace(vol,
                                                                state=VolumeState.RELEASING))
                await asyncio.to_thread(self.target.retire, vol.volume_id)
                await self.state.delete_volume(container_id)
                self.metrics.volumes.dec()
                log.info("rootfs released")
                return True

    async def get_volume(self, container_id: str) -> VolumeRecord:
        check_container_id(container_id)
        vol = await self.state.get_volume(container_id)
        if vol is None:
            raise NotFound(f"container {container_id!r} has no prepared rootfs")
        return vol

    def volume_usage(self, volume_id: str) -> tuple[int, int]:
        """(filesystem size, allocated bytes) of a clone."""
        vol = self.target.get_volume(volume_id)
        st = vol.path.stat()
        return vol.size, st.st_blocks * 512

    # ------------------------------------------------------------------ gc and recovery
    async def gc(self) -> tuple[int, int]:
        """Remove bases without image or clones, then unreferenced blobs; (bases, bytes)."""
        removed = 0
        images = {i.digest for i in await self.state.list_images()}
        volumes = await self.state.list_volumes()
        for base in await self.state.list_bases():
            if base.digest in images or any(v.base_id == base.id for v in volumes):
                continue
            await self._drop_base(base.id)
            await self.state.delete_base(base.id)
            removed += 1
        result = await asyncio.to_thread(collect, self.store)
        return removed, result.reclaimed_bytes

    async def evict_bases(self, keep: Collection[str] = ()) -> list[str]:
        """Above the ``[gc] high_water`` pool fill ratio, delete bases no clone uses, least
        recently built first, until below it. Their images stay: the next prepare rebuilds.
        """
        usage = await asyncio.to_thread(self.target.usage)
        limit = self.config.gc.high_water * usage.capacity
        if not usage.capacity or usage.used <= limit:
            return []
        in_use = {v.base_id for v in await self.state.list_volumes()} | set(keep)
        candidates = sorted((b for b in await self.state.list_bases()
                             if b.state is BaseState.READY and b.id not in in_use),
                            key=lambda b: b.built_at)
        evicted = []
        for base in candidates:
            await self._drop_base(base.id)
            await self.state.delete_base(base.id)
            evicted.append(base.id)
            log.info("base evicted above the high-water mark", extra={
                "base": base.id, "digest": base.digest, "pool_used": usage.used,
                "pool_capacity": usage.capacity})
            usage = await asyncio.to_thread(self.target.usage)
            if usage.used <= limit:
                break
        return evicted

    def _release_build_devices(self) -> list[str]:
        """Unmount and detach what a killed build left under the build directory."""
        done = []
        for mountpoint in fsutil.mounts_under(self.build_dir):
            try:
                DEFAULT.run(["umount", mountpoint])
            except CommandFailed:
                DEFAULT.run(["umount", "--lazy", mountpoint])
            done.append(f"unmounted partial build {os.path.basename(mountpoint)}")
        for minor, backing in loop.find_under(self.build_dir):
            if loop.detach(minor, backing):
                done.append(f"detached /dev/loop{minor} of partial build "
                            f"{os.path.basename(backing)}")
        return done

    async def recover(self) -> list[str]:
        """Reconcile the state database with the pool; returns the fixes made (also logged)."""
        fixes: list[str] = []

        def fix(msg: str, **extra: object) -> None:
            fixes.append(msg)
            log.warning("recovery: %s", msg, extra=extra)

        if self.build_dir.exists():
            # A streaming build runs while its pull downloads, so a crash can leave its image
            # mounted and loop-attached: release those before deleting the files.
            for what in await asyncio.to_thread(self._release_build_devices):
                fix(what)
            for leftover in self.build_dir.iterdir():
                fix(f"removed partial build {leftover.name}")
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        listing = await asyncio.to_thread(self.target.list)
        pool_bases = {b.id for b in listing.bases}
        pool_volumes = {v.id: v for v in listing.volumes}
        for base in await self.state.list_bases():
            if base.state is not BaseState.READY:
                fix(f"dropped unfinished base {base.id}", base=base.id)
                await asyncio.to_thread(self._destroy_base_quiet, base.id)
                await self.state.delete_base(base.id)
            elif base.id not in pool_bases:
                fix(f"forgot base {base.id}: missing from the pool", base=base.id)
                await self.state.delete_base(base.id)
        known_volumes = set()
        for vol in await self.state.list_volumes():
            known_volumes.add(vol.volume_id)
            if vol.state is not VolumeState.READY:
                fix(f"rolled back {vol.state.value} volume {vol.container_id}",
                    container_id=vol.container_id)
                await asyncio.to_thread(self.target.retire, vol.volume_id)
                await self.state.delete_volume(vol.container_id)
                continue
            pooled = pool_volumes.get(vol.volume_id)
            if pooled is None:
                fix(f"forgot volume {vol.container_id}: missing from the pool",
                    container_id=vol.container_id)
                await self.state.delete_volume(vol.container_id)
                continue
            if pooled.device is None:
                kind = ExportKind[vol.export_kind]
                device = await asyncio.to_thread(self.target.export, vol.volume_id, kind)
                fix(f"re-exported volume {vol.container_id} as {device.path}",
                    container_id=vol.container_id)
                await self.state.put_volume(dataclasses.replace(vol, device=device.to_json()))
        for orphan in set(pool_volumes) - known_volumes:
            fix(f"destroyed orphan volume {orphan}")
            await asyncio.to_thread(self.target.retire, orphan)
        db_bases = {b.id for b in await self.state.list_bases()}
        for orphan in pool_bases - db_bases:
            if not any(v.base_id == orphan for v in listing.volumes):
                fix(f"destroyed orphan base {orphan}")
                await asyncio.to_thread(self._destroy_base_quiet, orphan)
        self.metrics.volumes.set(len(await self.state.list_volumes()))
        return fixes
