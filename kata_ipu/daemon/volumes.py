"""Volumes: a container's rootfs — clone a READY base, export it, and back.

:class:`Volumes` owns the ``volumes`` rows. Calls on one container id are serialized
(:class:`.flights.KeyedLocks`); different ids run concurrently; blocking work (cloning,
ioctl-based exports) runs in worker threads.

Lifecycle of one container's rootfs::

    prepare(id, image) ─▶ resolve: image known? no ─▶ pull (cold; starts the base's build)
                          base READY?  no ─▶ build (cold; joins a build in flight)
                          materialize: a warm spare? ─▶ row READY (only recorded)
                                       else row CREATING ─▶ clone + export ─▶ row READY
    release(id)        ─▶ row RELEASING ─▶ unexport (hot-remove) ─▶ destroy ─▶ row gone

Every call is idempotent by its key: ``prepare`` of a prepared id returns the same device (or
refuses if the id was prepared from another image, base or export kind), ``release`` of an
unknown id succeeds. A crash between the row and the pool is repaired by :mod:`.recovery`.

May import: the state store, the block target and its model, the warm pool, :mod:`.images`
and :mod:`.builds` (a cold prepare pulls and builds), the daemon's small helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from kata_ipu.block.interface import BlockTarget
from kata_ipu.block.model import Device, ExportKind
from kata_ipu.daemon.builds import Builds
from kata_ipu.daemon.faults import crash_point
from kata_ipu.daemon.flights import KeyedLocks
from kata_ipu.daemon.ids import base_id_for, check_container_id, layers_of
from kata_ipu.daemon.images import Images
from kata_ipu.daemon.metrics import Metrics
from kata_ipu.daemon.state import (
    BaseRecord,
    BaseState,
    ImageRecord,
    PrepareView,
    StateStore,
    VolumeRecord,
    VolumeState,
)
from kata_ipu.daemon.warmpool import WarmPool
from kata_ipu.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KataIpuError,
    NotFound,
)
from kata_ipu.image.reference import Reference
from kata_ipu.log import bind

log = logging.getLogger("kata_ipu.daemon")


@dataclass(frozen=True)
class Prepared:
    volume: VolumeRecord
    cold: bool


@dataclass(frozen=True, slots=True)
class _Request:
    container_id: str
    ref: Reference
    export: ExportKind
    fstype: str
    platform: str
    annotations: dict[str, str]


@dataclass(slots=True)
class _Plan:
    """What ``prepare`` found (or pulled) before it makes anything."""

    image: ImageRecord | None
    base: BaseRecord | None
    layers: int
    cold: bool = False
    t0: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)

    def took(self, what: str, since: float) -> None:
        self.timings[what] = round(time.monotonic() - since, 3)


class Volumes:
    """Prepare and release container rootfs volumes."""

    def __init__(self, state: StateStore, target: BlockTarget, metrics: Metrics,
                 images: Images, builds: Builds, warm: WarmPool) -> None:
        self.state = state
        self.target = target
        self.metrics = metrics
        self.images = images
        self.builds = builds
        self.warm = warm
        self.locks = KeyedLocks()

    # -- prepare -----------------------------------------------------------------------------
    async def prepare(self, container_id: str, image: str, *, export: ExportKind,
                      fstype: str | None = None, platform: str = "",
                      annotations: dict[str, str] | None = None, layers: int = 0) -> Prepared:
        """``layers``: clone the base of the image's first N layers only (0: all of them)."""
        check_container_id(container_id)
        ref = self.images.reference(image)
        fs = self.images.fstype(fstype)
        if layers < 0:
            raise InvalidArgument(f"layers {layers} is negative")
        req = _Request(container_id, ref, export, fs, platform, dict(annotations or {}))
        with bind(container_id=container_id, image=str(ref)):
            async with self.locks.hold(container_id):
                return await self._prepare(req, layers)

    async def _prepare(self, req: _Request, layers: int) -> Prepared:
        view = await self.state.prepare_view(req.container_id, str(req.ref),
                                             lambda digest: base_id_for(digest, req.fstype))
        plan = await self._resolve(req, view, layers)
        if view.volume is not None:
            return self._existing(view.volume, req, plan.layers, await self._same_image(
                view.volume, req.ref))
        img = plan.image
        assert img is not None  # no volume yet: pulled if it was not known
        base = await self._ready_base(req, img, plan)
        t2 = time.monotonic()
        vol, spare = await self._materialize(req, img, base)
        self.warm.wanted(base.id, req.export)
        self.metrics.volumes.inc()
        plan.took("clone_export_seconds", t2)
        plan.took("seconds", plan.t0)
        log.info("rootfs prepared", extra={"digest": img.digest, "cold": plan.cold,
                                           "device": vol.device.path if vol.device else None,
                                           "spare": spare, **plan.timings})
        return Prepared(vol, plan.cold)

    async def _resolve(self, req: _Request, view: PrepareView, layers: int) -> _Plan:
        """The image (pulled now if neither it nor the volume is known), its base of the
        asked ``layers`` (none if not built yet) and the ``layers`` that base holds."""
        plan = _Plan(view.image, view.base, layers)
        if plan.image is None and view.volume is None:
            plan.cold = True
            # Starts the base's build while the layers download; _ready_base joins that build.
            plan.image = await self.images.pull_once(req.ref, req.platform, req.fstype)
            plan.took("pull_seconds", plan.t0)
            plan.base = await self.state.get_base(base_id_for(plan.image.digest, req.fstype))
        if layers and plan.image is not None:
            count = await asyncio.to_thread(self.images.layer_count, plan.image.digest)
            if layers > count:
                raise InvalidArgument(f"image {req.ref} has {count} layers, not {layers}")
            if layers < count:
                plan.base = await self.state.get_base(
                    base_id_for(plan.image.digest, req.fstype, layers))
            else:
                plan.layers = 0  # all of them: the image's own base
        return plan

    async def _ready_base(self, req: _Request, img: ImageRecord, plan: _Plan) -> BaseRecord:
        if plan.base is not None and plan.base.state is BaseState.READY:
            return plan.base
        plan.cold = True
        t1 = time.monotonic()
        base = await self.builds.ensure(img.digest, req.fstype, str(req.ref), plan.layers)
        plan.took("base_seconds", t1)
        return base

    async def _same_image(self, vol: VolumeRecord, ref: Reference) -> bool:
        """Whether ``ref`` names the image ``vol`` was prepared from."""
        if vol.image == str(ref):
            return True
        img = await self.state.get_image(str(ref))
        return img is not None and img.digest == vol.digest

    @staticmethod
    def _existing(vol: VolumeRecord, req: _Request, layers: int, same_image: bool
                  ) -> Prepared:
        """A repeated ``prepare``: the same volume, or why it cannot be."""
        if not same_image:
            raise AlreadyExists(f"container {vol.container_id!r} is already prepared "
                                f"with image {vol.image!r}")
        if layers_of(vol.base_id) != layers:
            raise AlreadyExists(f"container {vol.container_id!r} is already prepared from "
                                f"another base ({vol.base_id}) of image {vol.image!r}")
        if vol.state is not VolumeState.READY:
            raise FailedPrecondition(f"container {vol.container_id!r} is {vol.state.value}")
        if vol.export_kind is not req.export:
            raise AlreadyExists(f"container {vol.container_id!r} is already exported as "
                                f"{vol.export_kind.name}, not {req.export.name}")
        return Prepared(vol, False)

    async def _materialize(self, req: _Request, img: ImageRecord, base: BaseRecord
                           ) -> tuple[VolumeRecord, bool]:
        """The READY volume row of a new rootfs, and whether a warm spare became it."""
        spare = self.warm.take(base.id, req.export)
        if spare is not None:  # already cloned and exported: only recorded now
            vol = self._row(req, img, base, spare.volume_id, VolumeState.READY, spare.device)
            try:
                await self.state.put_volume(vol)
            except BaseException:
                await asyncio.to_thread(self.target.retire, spare.volume_id)
                raise
            return vol, True
        vol = self._row(req, img, base, req.container_id, VolumeState.CREATING, None)
        await self.state.put_volume(vol)
        try:
            device = await asyncio.to_thread(self._clone_export, base.id, req.container_id,
                                             req.export)
        except BaseException:
            await asyncio.to_thread(self._destroy_quiet, req.container_id)
            await self.state.delete_volume(req.container_id)
            raise
        vol = dataclasses.replace(vol, state=VolumeState.READY, device=device)
        await self.state.put_volume(vol)
        return vol, False

    @staticmethod
    def _row(req: _Request, img: ImageRecord, base: BaseRecord, volume_id: str,
             state: VolumeState, device: Device | None) -> VolumeRecord:
        return VolumeRecord(req.container_id, volume_id, base.id, str(req.ref), img.digest,
                            state, req.export, device, dict(req.annotations), time.time())

    def _clone_export(self, base_id: str, volume_id: str, kind: ExportKind) -> Device:
        self.target.clone(base_id, volume_id)
        crash_point("clone")
        device = self.target.export(volume_id, kind)
        crash_point("export")
        return device

    def _destroy_quiet(self, volume_id: str) -> None:
        try:
            self.target.destroy(volume_id, missing_ok=True)
        except KataIpuError:
            log.exception("cleanup of volume %s failed", volume_id)

    # -- release and lookups -----------------------------------------------------------------
    async def release(self, container_id: str) -> bool:
        """Unexport then destroy; True if something was released. Idempotent."""
        check_container_id(container_id)
        with bind(container_id=container_id):
            async with self.locks.hold(container_id):
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
