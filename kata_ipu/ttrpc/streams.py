"""ttrpc v1.2 streaming: Data frames and the remote-open / remote-closed flags.

A stream is a Request whose flags say it is not unary, followed by Data frames::

    client streaming   Request[RO] → Data … → Data[RC]        ← Response (one reply)
    server streaming   Request[RC] (the request)               ← Data … ← Data[RC|NO_DATA]
    bidirectional      Request[RO] → Data …  ⇄  ← Data …       ← Data[RC|NO_DATA]

An error always ends a stream with a Response carrying the status. A Request with empty flags
is unary (what every v1.1 peer sends), so a stream method called by a v1.1 client sees one
message and a closed remote. On the receiving side each stream buffers at most
:data:`STREAM_BUFFER` messages; a peer that overruns it gets RESOURCE_EXHAUSTED on that stream
(Go waits a second, then fails with ErrStreamFull).

Debian's Go peer is ttrpc 1.1.1 (unary only), so streaming is tested Python to Python.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kata_ipu.errors import KataIpuError, ResourceExhausted
from kata_ipu.ttrpc.errors import ProtocolError
from kata_ipu.ttrpc.frame import Flags

if TYPE_CHECKING:
    from kata_ipu.ttrpc.server import CallContext

STREAM_BUFFER = 64

_END = object()


class _Inbox:
    """Messages received on one stream, in order, ending with _END or an exception."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[bytes | object | BaseException] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: bytes | object | BaseException) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> bytes | None:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items[0]
        if item is _END:
            return None  # stays queued: every later get() also sees the end
        self._items.popleft()
        if isinstance(item, BaseException):
            self._items.appendleft(_END)
            raise item
        assert isinstance(item, bytes)
        return item


class _Receiver:
    """The receiving side shared by both stream ends: ``recv()`` and ``async for``."""

    _inbox: _Inbox

    async def recv(self) -> bytes | None:
        return await self._inbox.get()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        item = await self.recv()
        if item is None:
            raise StopAsyncIteration
        return item


class ServerStream(_Receiver):
    """The server's side of one stream: ``recv()`` client messages, ``send()`` replies."""

    def __init__(self, send: Callable[[int, bytes], Awaitable[None]], stream_id: int,
                 initial: bytes | None, remote_closed: bool) -> None:
        self._send = send
        self.stream_id = stream_id
        self._inbox = _Inbox()
        self.remote_closed = False
        if initial is not None:
            self._inbox.put(initial)
        if remote_closed:
            self._close_remote()

    def _close_remote(self) -> None:
        if not self.remote_closed:
            self.remote_closed = True
            self._inbox.put(_END)

    def _feed(self, flags: int, data: bytes) -> None:
        """A Data frame arrived for this stream (called from the connection's reader)."""
        if self.remote_closed:
            raise ProtocolError("data received after the remote closed the stream")
        if flags & Flags.REMOTE_CLOSED and data:
            raise ProtocolError("data close message cannot include data")
        if not flags & Flags.NO_DATA and not (flags & Flags.REMOTE_CLOSED):
            if len(self._inbox) >= STREAM_BUFFER:
                raise ResourceExhausted("ttrpc: stream buffer full")
            self._inbox.put(data)
        if flags & Flags.REMOTE_CLOSED:
            self._close_remote()

    async def recv(self) -> bytes | None:
        """The next client message, or None once the client closed its side."""
        return await self._inbox.get()

    async def send(self, data: bytes) -> None:
        await self._send(0, data)


StreamHandler = Callable[["CallContext", ServerStream], Awaitable[bytes | None]]


@dataclass(frozen=True, slots=True)
class StreamMethod:
    """A streaming method for :meth:`Server.register`.

    The handler returns the single reply for a client-streaming method, and None for a
    server-streaming one (it sends with ``stream.send``).
    """

    handler: StreamHandler
    client_streaming: bool
    server_streaming: bool


class ClientStream(_Receiver):
    """The client's side of one stream."""

    def __init__(self, stream_id: int, send: Callable[[int, bytes], Awaitable[None]],
                 release: Callable[[int], None], client_streaming: bool) -> None:
        self.stream_id = stream_id
        self._send = send
        self._release = release
        self._inbox = _Inbox()
        self._local_closed = not client_streaming
        self._finished = False
        self._timer: asyncio.TimerHandle | None = None

    # -- fed by the client's reader
    def _data(self, flags: int, data: bytes) -> None:
        if not flags & Flags.NO_DATA:
            self._inbox.put(data)
        if flags & Flags.REMOTE_CLOSED:
            self._finish()

    def _response(self, payload: bytes) -> None:
        if payload:
            self._inbox.put(payload)
        self._finish()

    def _fail(self, error: BaseException) -> None:
        if not self._finished:
            self._inbox.put(error)
            self._finished = True
            self._release(self.stream_id)

    def _finish(self) -> None:
        if not self._finished:
            self._inbox.put(_END)
            self._finished = True
            self._release(self.stream_id)

    # -- API
    async def send(self, data: bytes) -> None:
        if self._local_closed:
            raise KataIpuError("ttrpc: send on a stream whose sending side is closed")
        await self._send(0, data)

    async def close_send(self) -> None:
        """Tell the server no more messages follow (Data[RC|NO_DATA])."""
        if not self._local_closed:
            self._local_closed = True
            await self._send(Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")

    async def recv(self) -> bytes | None:
        """The next server message; None at the end; raises the server's error status."""
        return await self._inbox.get()
