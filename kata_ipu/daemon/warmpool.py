"""Warm pool: exported spare clones of hot bases, so that a warm ``Prepare`` hands one out.

Without it a warm ``Prepare`` clones the base (``FICLONE``), attaches a loop device and
records both while the container waits: 1-6 ms on the 2-core CI machine, more while the
host is busy starting that very container. With ``[rootfs] warm_clones = N`` the daemon
keeps up to ``N`` spares per (base, export kind) that a ``Prepare`` has asked for, and
``Prepare`` takes one instead (its volume record names the spare's volume id).

Lifecycle of a spare::

    wanted(base, kind) ─(REFILL_DELAY)→ clone + export, in a worker thread → idle
    idle ─take()→ the caller's volume: released by the caller like any other
    idle ─drop(base) / close()→ unexport + destroy

The refill waits :data:`REFILL_DELAY` because a ``Prepare`` is followed by the start of its
container, which should not share the CPU with the next spare's clone.

Spares have no database rows. A daemon killed while it holds spares leaves pool volumes that
nobody recorded, and recovery removes them as orphans (docs/adr/0003) — which is what they
are. Their ids start with :data:`PREFIX`, which container ids may not use.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from kata_ipu.block import ExportKind
from kata_ipu.block.interface import BlockTarget
from kata_ipu.block.model import Device
from kata_ipu.errors import KataIpuError

log = logging.getLogger("kata_ipu.daemon.warmpool")

PREFIX = "spare."
REFILL_DELAY = 0.25  # seconds after a take before the replacement is made
KINDS = frozenset({ExportKind.HOST_BLOCK})  # a VM export's serial must name its container


@dataclass(frozen=True, slots=True)
class Spare:
    volume_id: str
    base_id: str
    kind: ExportKind
    device: Device


class WarmPool:
    """Spares per (base, kind); every method runs on the daemon's event loop."""

    def __init__(self, target: BlockTarget, per_base: int,
                 refill_delay: float = REFILL_DELAY,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.target = target
        self.per_base = max(0, per_base)
        self.refill_delay = refill_delay
        self.on_change = on_change  # told the number of idle spares
        self._idle: dict[tuple[str, ExportKind], list[Spare]] = {}
        self._making: dict[tuple[str, ExportKind], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closing = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.per_base > 0

    def count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def spares(self) -> list[Spare]:
        return [s for v in self._idle.values() for s in v]

    # -- hand out -------------------------------------------------------------------------
    def take(self, base_id: str, kind: ExportKind) -> Spare | None:
        """An idle spare of ``base_id`` exported as ``kind``, now the caller's; or None."""
        idle = self._idle.get((base_id, kind))
        if not idle:
            return None
        spare = idle.pop()
        self._changed()
        log.debug("spare taken", extra={"volume": spare.volume_id, "base": base_id})
        return spare

    def wanted(self, base_id: str, kind: ExportKind) -> None:
        """A ``Prepare`` of ``base_id`` as ``kind`` happened: top its spares up, later."""
        if not self.enabled or self._closed or kind not in KINDS:
            return
        key = (base_id, kind)
        missing = self.per_base - len(self._idle.get(key, ())) - self._making.get(key, 0)
        if missing <= 0:
            return
        self._making[key] = self._making.get(key, 0) + missing
        # a fresh context: the log fields bound for the Prepare that asked (its container id)
        # do not describe the spares made later
        task = asyncio.get_running_loop().create_task(self._refill(key, missing),
                                                      context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refill(self, key: tuple[str, ExportKind], n: int) -> None:
        base_id, kind = key
        try:
            # not cancelled on close (a clone in a worker thread cannot be): woken instead
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.refill_delay)
            for _ in range(n):
                if self._closed:
                    return
                volume_id = f"{PREFIX}{secrets.token_hex(8)}"
                try:
                    device = await asyncio.to_thread(self._make, base_id, volume_id, kind)
                except KataIpuError as exc:
                    # pool full, base gone...: no spare this time; Prepare works without
                    log.warning("no spare for base %s: %s", base_id, exc)
                    return
                if self._closed or self._making.get(key, 0) <= 0:
                    await asyncio.to_thread(self.target.retire, volume_id)  # dropped meanwhile
                    return
                self._making[key] -= 1
                self._idle.setdefault(key, []).append(Spare(volume_id, base_id, kind, device))
                self._changed()
                log.info("spare ready", extra={"volume": volume_id, "base": base_id,
                                               "device": device.path})
        finally:
            self._making.pop(key, None)

    def _make(self, base_id: str, volume_id: str, kind: ExportKind) -> Device:
        self.target.clone(base_id, volume_id)
        try:
            return self.target.export(volume_id, kind)
        except BaseException:
            self.target.retire(volume_id)
            raise

    # -- take back --------------------------------------------------------------------------
    async def drop(self, base_id: str) -> None:
        """Destroy the spares of ``base_id`` (before the base itself goes)."""
        for key in [k for k in self._idle if k[0] == base_id]:
            for spare in self._idle.pop(key):
                await asyncio.to_thread(self.target.retire, spare.volume_id)
        for key in [k for k in self._making if k[0] == base_id]:
            self._making[key] = 0  # a refill in flight destroys what it makes
        self._changed()

    async def close(self) -> None:
        """Destroy every spare; refills in flight finish the spare they are making and
        destroy it."""
        self._closed = True
        self._closing.set()
        for task in list(self._tasks):
            with contextlib.suppress(KataIpuError):
                await task
        for base_id in {k[0] for k in self._idle}:
            await self.drop(base_id)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.count())
