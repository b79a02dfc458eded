"""The IPU's control path, composed: pull → build the base once → clone → export, and back.

:class:`Engine` opens the state database, the content store and puller
(``kata_ipu.image``/``content``) and the block target (``kata_ipu.block``), and wires the
collaborators that each do one job:

=================== ========================================================================
``images``          :class:`.images.Images` — pulls (single flight per reference+platform),
                    image rows, listing and removal
``builds``          :class:`.builds.Builds` — bases (single flight per base id), streaming
                    builds started by a pull
``volumes``         :class:`.volumes.Volumes` — Prepare/Release of container rootfs volumes
``collector``       :class:`.gc.Collector` — GC and eviction above the pool's high water
``recovery``        :class:`.recovery.Recovery` — reconcile database and pool on start
``warm``            :class:`.warmpool.WarmPool` — exported spare clones
=================== ========================================================================

Lifecycle: ``Engine.open`` → ``recovery.run()`` (before listening; docs/adr/0007) → serve →
``close`` (spares destroyed, build directory removed if empty, target, store and database
closed). Every collaborator records intent in the state database before each change, so a
crash at any point is repaired by the next start's recovery.
"""

from __future__ import annotations

import asyncio
import contextlib

from kata_ipu.block.interface import BlockTarget
from kata_ipu.block.pool import create_pool
from kata_ipu.content.store import ContentStore
from kata_ipu.daemon import warmpool
from kata_ipu.daemon.builds import Builds
from kata_ipu.daemon.config import Config
from kata_ipu.daemon.flights import Flights, StatusBoard
from kata_ipu.daemon.gc import Collector
from kata_ipu.daemon.images import Images
from kata_ipu.daemon.metrics import Metrics
from kata_ipu.daemon.recovery import Recovery
from kata_ipu.daemon.state import StateStore
from kata_ipu.daemon.volumes import Volumes
from kata_ipu.image.credentials import CredentialChain, DockerConfigFile, default_credentials
from kata_ipu.image.pull import Puller


class Engine:
    """The daemon's core, composed. Create with :meth:`open`, stop with :meth:`close`."""

    def __init__(self, config: Config, state: StateStore, store: ContentStore, puller: Puller,
                 target: BlockTarget, metrics: Metrics) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.puller = puller
        self.target = target
        self.metrics = metrics
        flights, board = Flights(), StatusBoard()
        self.warm = warmpool.WarmPool(target, config.rootfs.warm_clones,
                                      on_change=metrics.spares.set)
        self.collector = Collector(config, state, store, target, self.warm)
        self.builds = Builds(config, state, store, target, metrics, flights, board,
                             self.collector.evict_bases)
        self.images = Images(config, state, store, puller, metrics, self.builds,
                             self.collector, flights, board)
        self.volumes = Volumes(state, target, metrics, self.images, self.builds, self.warm)
        self.recovery = Recovery(state, target, metrics, self.builds.build_dir)

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
            self.builds.build_dir.rmdir()  # only when empty: recovery owns leftovers
        await asyncio.to_thread(self.target.close)
        await asyncio.to_thread(self.store.close)
        await self.state.close()
