"""Bases: build an image's filesystem once and import it into the block pool.

:class:`Builds` is the one place a base is made. Every build is the single flight
``BuildKey(base_id)`` (:mod:`.flights`), whoever asks for it: a ``Prepare`` that finds no
READY base (:meth:`Builds.ensure`), or a pull that starts the build as soon as the manifest is
known and streams the layers into it while they download (:meth:`Builds.start_streaming`,
see :mod:`.pipeline`).

Lifecycle of one base (rows in the state database, files in the build directory)::

    row BUILDING ─▶ build <base>.img in <pool>/build ─▶ (streaming: wait for the pull's gate)
        ─▶ import_base (a reflink into the pool) ─▶ row READY ─▶ evict others above high water
    any failure ─▶ row deleted, partial image removed (ENOSPC becomes ResourceExhausted)
    SIGKILL     ─▶ recovery drops the BUILDING row and the writer's leftovers (:mod:`.recovery`)

May import: ``kata_ipu.rootfs`` (the builder), ``kata_ipu.block`` (the target), the state
store, and the daemon's small helpers (flights, faults, ids, pipeline).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

from kata_ipu.block.interface import BlockTarget
from kata_ipu.content.follow import IngestRestarted
from kata_ipu.content.store import ContentStore
from kata_ipu.daemon.config import Config
from kata_ipu.daemon.faults import crash_point, out_of_space
from kata_ipu.daemon.flights import BuildKey, Flights, PullStatus, StatusBoard
from kata_ipu.daemon.ids import base_id_for
from kata_ipu.daemon.metrics import Metrics
from kata_ipu.daemon.pipeline import PullGate, StreamingSource
from kata_ipu.daemon.state import BaseRecord, BaseState, StateStore
from kata_ipu.errors import ResourceExhausted
from kata_ipu.image.pull import PullPlan
from kata_ipu.log import bind
from kata_ipu.rootfs.builder import BuildConfig, BuildResult, RootfsBuilder
from kata_ipu.rootfs.oci import ImageSource, OciLayoutSource
from kata_ipu.rootfs.writers import SizePolicy

log = logging.getLogger("kata_ipu.daemon")

Evict = Callable[[Collection[str]], Awaitable[object]]


class Builds:
    """Makes bases, one flight per base id."""

    def __init__(self, config: Config, state: StateStore, store: ContentStore,
                 target: BlockTarget, metrics: Metrics, flights: Flights,
                 board: StatusBoard, evict: Evict) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.target = target
        self.metrics = metrics
        self.flights = flights
        self.board = board
        self.evict = evict  # called after every build, keeping the new base
        # Bases are built inside the pool's filesystem, so import_base's copy_file_range
        # becomes a reflink (XFS) instead of a byte copy.
        self.build_dir: Path = target.pool.data_dir / "build"

    async def ensure(self, digest: str, fstype: str, name: str, layers: int = 0
                     ) -> BaseRecord:
        """The READY base of ``digest`` as ``fstype`` (first ``layers`` layers), built now
        (or joined, if a build of it is running) when there is none."""
        base_id = base_id_for(digest, fstype, layers)
        rec = await self.state.get_base(base_id)
        if rec is not None and rec.state is BaseState.READY:
            return rec
        key = BuildKey(base_id)
        try:
            return await self.flights.once(key, lambda: self._build(
                digest, fstype, base_id, name, layers=layers))
        except IngestRestarted:
            # We joined a streaming build whose download started over (its bytes can no
            # longer be trusted); the pull finished, so build once more from the store.
            log.info("streaming build lost its source; building from the store",
                     extra={"base": base_id})
            return await self.flights.once(key, lambda: self._build(
                digest, fstype, base_id, name, layers=layers))

    def start_streaming(self, plan: PullPlan, fstype: str, name: str,
                        abort: threading.Event, gate: PullGate
                        ) -> asyncio.Future[BaseRecord] | None:
        """Start building the base of a pull in flight from the layers as they arrive;
        None if that base is already being built (from the store, or by another pull)."""
        key = BuildKey(base_id_for(plan.digest, fstype))
        if key in self.flights:
            return None
        source = StreamingSource(self.store, plan, abort)
        return self.flights.start(key, lambda: self._build(
            plan.digest, fstype, key.base_id, name, source=source, gate=gate))

    def _builder(self, fstype: str, source: ImageSource | None) -> RootfsBuilder:
        rc = self.config.rootfs
        return RootfsBuilder(
            source or OciLayoutSource(self.config.content_dir),
            BuildConfig(fs_type="erofs" if fstype == "erofs" else "ext4",
                        size=SizePolicy(headroom_ratio=rc.headroom, min_size=rc.min_size,
                                        max_size=rc.max_size)))

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
        status = PullStatus(name, digest, "building", None, time.time())
        with self.board.showing(BuildKey(base_id), status):
            await self.state.put_base(BaseRecord(base_id, digest, fstype, BaseState.BUILDING,
                                                 layers=layers))
            start = time.monotonic()
            try:
                result, built, size = await self._make(digest, fstype, base_id, name,
                                                       source, gate, layers)
            finally:
                for leftover in self.build_dir.glob(f"{base_id}.img*"):
                    leftover.unlink(missing_ok=True)
        seconds = time.monotonic() - start
        rec = BaseRecord(base_id, digest, fstype, BaseState.READY, size, time.time(),
                         seconds, layers)
        await self.state.put_base(rec)
        self.metrics.builds.labels("ok").inc()
        log.info("base built", extra={"digest": digest, "base": base_id, "layers": layers,
                                      "seconds": round(seconds, 3),
                                      "build_seconds": round(built - start, 3),
                                      "import_seconds": round(time.monotonic() - built, 3),
                                      "stages": result.record.get("stages", {})})
        await self.evict({base_id})
        return rec

    async def _make(self, digest: str, fstype: str, base_id: str, name: str,
                    source: ImageSource | None, gate: PullGate | None, layers: int
                    ) -> tuple[BuildResult, float, int]:
        """Build the image file and import it: (build result, time it was built, size).
        On failure the BUILDING row is deleted; a full pool is a ResourceExhausted."""
        self.build_dir.mkdir(parents=True, exist_ok=True)
        out = self.build_dir / f"{base_id}.img"
        try:
            with bind(image=name, digest=digest):
                result = await self._builder(fstype, source).abuild(digest, out, layers=layers)
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
            if out_of_space(exc):
                raise ResourceExhausted(
                    f"block pool {self.target.pool.root} is full while building the base of "
                    f"{name}: release volumes, remove images or run gc") from exc
            raise
        return result, built, base.size
