"""Garbage collection: bases nobody needs, blobs nothing references, the pool's high water.

:class:`Collector` is the one place a base is destroyed on purpose (recovery destroys only
what a crash left). Destroying a base always takes its idle warm-pool spares first (they are
its clones), then the pool's base, then its row.

* :meth:`Collector.gc` — ``SystemService.Gc``: bases with neither image nor clone, then the
  content store's unreferenced blobs (:func:`kata_ipu.content.gc.collect`).
* :meth:`Collector.evict_bases` — after every build: above ``[gc] high_water`` of the pool's
  capacity, bases no clone uses go, least recently built first, until below it. Their images
  stay, so the next ``Prepare`` rebuilds.

May import: the state store, the block target, the content store's collector, the warm pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from kata_ipu.block.interface import BlockTarget
from kata_ipu.content.gc import collect
from kata_ipu.content.store import ContentStore
from kata_ipu.daemon.config import Config
from kata_ipu.daemon.state import BaseState, StateStore
from kata_ipu.daemon.warmpool import WarmPool
from kata_ipu.errors import NotFound

log = logging.getLogger("kata_ipu.daemon")


def destroy_base_quiet(target: BlockTarget, base_id: str) -> None:
    """Destroy a pool base; one already gone is fine."""
    try:
        target.destroy_base(base_id)
    except NotFound:
        pass


class Collector:
    """Removes bases and blobs nothing needs any more."""

    def __init__(self, config: Config, state: StateStore, store: ContentStore,
                 target: BlockTarget, warm: WarmPool) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.target = target
        self.warm = warm

    async def drop_base(self, base_id: str) -> None:
        """Destroy a base, its idle spares first (they are clones of it), then its row."""
        await self.warm.drop(base_id)
        await asyncio.to_thread(destroy_base_quiet, self.target, base_id)
        await self.state.delete_base(base_id)

    async def gc(self) -> tuple[int, int]:
        """Remove bases without image or clones, then unreferenced blobs; (bases, bytes)."""
        removed = 0
        images = {i.digest for i in await self.state.list_images()}
        volumes = await self.state.list_volumes()
        for base in await self.state.list_bases():
            if base.digest in images or any(v.base_id == base.id for v in volumes):
                continue
            await self.drop_base(base.id)
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
            await self.drop_base(base.id)
            evicted.append(base.id)
            log.info("base evicted above the high-water mark", extra={
                "base": base.id, "digest": base.digest, "pool_used": usage.used,
                "pool_capacity": usage.capacity})
            usage = await asyncio.to_thread(self.target.usage)
            if usage.used <= limit:
                break
        return evicted
