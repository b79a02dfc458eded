"""Concurrency bookkeeping of the daemon: single flights, per-id locks, the status board.

Three small typed objects, each with one job, all used on the daemon's event loop only:

* :class:`Flights` — *single flight*: concurrent callers with one :data:`FlightKey` share one
  execution. A pull is :class:`PullKey` (reference, platform), a build :class:`BuildKey`
  (base id); the same key object names the flight *and* its :class:`PullStatus` entry.
* :class:`KeyedLocks` — calls on one container id are serialized, different ids run
  concurrently; a lock lives only while someone holds or waits for it.
* :class:`StatusBoard` — what is in flight now, for ``ImageService.Status``.

Lifecycle of one flight::

    start(key, factory) ─▶ running (joined by every start/join of the same key) ─▶ done
                                                                  └─▶ key forgotten
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kata_ipu.image.pull import PullProgress

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PullKey:
    """One pull: an image reference resolved for one platform."""

    reference: str
    platform: str


@dataclass(frozen=True, slots=True)
class BuildKey:
    """One build: the base it makes."""

    base_id: str


FlightKey = PullKey | BuildKey


@dataclass(frozen=True)
class PullStatus:
    """One pull or build in flight, for ImageService.Status."""

    image: str
    digest: str
    phase: str
    progress: PullProgress | None
    started_at: float
    error: str = ""


class Flights:
    """Single flight per :data:`FlightKey`."""

    def __init__(self) -> None:
        self._running: dict[FlightKey, asyncio.Future[Any]] = {}

    def __contains__(self, key: FlightKey) -> bool:
        return key in self._running

    def start(self, key: FlightKey, factory: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """The running execution for ``key``, started from ``factory`` if there is none."""
        fut = self._running.get(key)
        if fut is None:
            fut = asyncio.ensure_future(factory())
            self._running[key] = fut
            fut.add_done_callback(lambda _f: self._running.pop(key, None))
        return fut

    async def once(self, key: FlightKey, factory: Callable[[], Awaitable[T]]) -> T:
        """Join (or start) the flight of ``key``; a cancelled caller does not cancel it."""
        return await asyncio.shield(self.start(key, factory))


@dataclass(slots=True)
class _Held:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holders + waiters


class KeyedLocks:
    """One :class:`asyncio.Lock` per key, alive while someone holds or waits for it."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._held.get(key)
        if entry is None:
            entry = self._held[key] = _Held()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                self._held.pop(key, None)


class StatusBoard:
    """The pulls and builds in flight, by the key of their flight."""

    def __init__(self) -> None:
        self._now: dict[FlightKey, PullStatus] = {}

    @contextlib.contextmanager
    def showing(self, key: FlightKey, status: PullStatus) -> Iterator[PullStatus]:
        self._now[key] = status
        try:
            yield status
        finally:
            self._now.pop(key, None)

    def now(self, image: str = "") -> list[PullStatus]:
        return [s for s in self._now.values() if not image or s.image.startswith(image)]
