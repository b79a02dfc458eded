"""Daemon-level recovery: reconcile the state database with the block pool on start.

Runs once, after ``open_pool()`` repaired the pool's own records (block level, see
docs/adr/0007-two-level-state.md) and before the daemon listens. The pool is what exists; the
database is what was meant. Steps, in this order::

    1. partial builds  the rootfs writer's leftovers in <pool>/build (mounts, loop devices,
                       files) — :func:`kata_ipu.rootfs.leftovers.cleanup_leftovers`
    2. bases           BUILDING rows: dropped with their pool base; READY rows the pool lacks:
                       forgotten
    3. volumes         CREATING/RELEASING rows: rolled back (the pool volume retired);
                       READY rows the pool lacks: forgotten; READY rows whose export is gone
                       (a reboot): re-exported, the new device recorded
    4. orphans         pool volumes no row names (warm spares included): retired; pool bases
                       no row names and no volume uses: destroyed

Each fix is one ``warning`` line starting with ``recovery:`` and one entry of the list
:meth:`Recovery.run` returns.

May import: the state store, the block target and its model, ``kata_ipu.rootfs.leftovers``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from kata_ipu.block.interface import BlockTarget
from kata_ipu.block.model import Listing, Volume
from kata_ipu.daemon.gc import destroy_base_quiet
from kata_ipu.daemon.metrics import Metrics
from kata_ipu.daemon.state import BaseState, StateStore, VolumeRecord, VolumeState
from kata_ipu.executor import DEFAULT, Executor
from kata_ipu.rootfs.leftovers import cleanup_leftovers

log = logging.getLogger("kata_ipu.daemon")


class Recovery:
    """One reconciliation of the database with the pool; see the module docstring."""

    def __init__(self, state: StateStore, target: BlockTarget, metrics: Metrics,
                 build_dir: Path, executor: Executor = DEFAULT) -> None:
        self.state = state
        self.target = target
        self.metrics = metrics
        self.build_dir = build_dir
        self.executor = executor
        self.fixes: list[str] = []

    def _fix(self, msg: str, **extra: object) -> None:
        self.fixes.append(msg)
        log.warning("recovery: %s", msg, extra=extra)

    async def run(self) -> list[str]:
        """Reconcile; returns the fixes made (also logged)."""
        self.fixes = []
        # A streaming build runs while its pull downloads, so a crash can leave its image
        # mounted and loop-attached: the writer releases those before deleting the files.
        for what in await asyncio.to_thread(cleanup_leftovers, self.build_dir,
                                            executor=self.executor):
            self._fix(what)
        listing = await asyncio.to_thread(self.target.list)
        await self._bases({b.id for b in listing.bases})
        pool_volumes = {v.id: v for v in listing.volumes}
        known = set()
        for vol in await self.state.list_volumes():
            known.add(vol.volume_id)
            await self._volume(vol, pool_volumes.get(vol.volume_id))
        await self._orphans(listing, set(pool_volumes) - known)
        self.metrics.volumes.set(len(await self.state.list_volumes()))
        return list(self.fixes)

    async def _bases(self, pool_bases: set[str]) -> None:
        for base in await self.state.list_bases():
            if base.state is not BaseState.READY:
                self._fix(f"dropped unfinished base {base.id}", base=base.id)
                await asyncio.to_thread(destroy_base_quiet, self.target, base.id)
                await self.state.delete_base(base.id)
            elif base.id not in pool_bases:
                self._fix(f"forgot base {base.id}: missing from the pool", base=base.id)
                await self.state.delete_base(base.id)

    async def _volume(self, vol: VolumeRecord, pooled: Volume | None) -> None:
        if vol.state is not VolumeState.READY:
            self._fix(f"rolled back {vol.state.value} volume {vol.container_id}",
                      container_id=vol.container_id)
            await asyncio.to_thread(self.target.retire, vol.volume_id)
            await self.state.delete_volume(vol.container_id)
        elif pooled is None:
            self._fix(f"forgot volume {vol.container_id}: missing from the pool",
                      container_id=vol.container_id)
            await self.state.delete_volume(vol.container_id)
        elif pooled.device is None:
            device = await asyncio.to_thread(self.target.export, vol.volume_id,
                                             vol.export_kind)
            self._fix(f"re-exported volume {vol.container_id} as {device.path}",
                      container_id=vol.container_id)
            await self.state.put_volume(dataclasses.replace(vol, device=device))

    async def _orphans(self, listing: Listing, volumes: set[str]) -> None:
        for orphan in volumes:
            self._fix(f"destroyed orphan volume {orphan}")
            await asyncio.to_thread(self.target.retire, orphan)
        db_bases = {b.id for b in await self.state.list_bases()}
        for base in listing.bases:
            if base.id in db_bases or any(v.base_id == base.id for v in listing.volumes):
                continue
            self._fix(f"destroyed orphan base {base.id}")
            await asyncio.to_thread(destroy_base_quiet, self.target, base.id)
