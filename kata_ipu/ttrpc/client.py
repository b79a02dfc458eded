"""asyncio ttrpc client: many concurrent unary calls multiplexed on one connection.

Lifecycle (python-qemu-qmp style, guarded by :class:`Runstate`)::

    IDLE ──connect()──▶ RUNNING ──close() / peer hangs up──▶ CLOSED

* Every call takes the next odd stream id (1, 3, 5, ... strictly increasing) and waits for the
  Response with that id; responses may come back in any order.
* A deadline is sent as ``timeout_nano`` (the time remaining) and also enforced locally: a call
  whose deadline passes raises :class:`~kata_ipu.errors.DeadlineExceeded` and a late response
  is dropped.
* Cancelling the awaiting task abandons the call (ttrpc v1.1 has no cancel frame).
* When the connection drops, every pending call fails with
  :class:`~kata_ipu.ttrpc.errors.ConnectionClosed`; so does every later call. Reconnecting is
  the caller's policy: make a new client.
* A non-OK status from the peer is raised as the project error class for that code
  (``NotFound``, ``Unimplemented``...), with the peer's message.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from types import TracebackType
from typing import Protocol, TypeVar

from kata_ipu.errors import DeadlineExceeded, KataIpuError, ResourceExhausted, error_for_code
from kata_ipu.ttrpc.address import Address, TcpAddress, UnixAddress, parse_address
from kata_ipu.ttrpc.errors import ConnectionClosed, OversizedMessage, ProtocolError
from kata_ipu.ttrpc.frame import (
    MESSAGE_LENGTH_MAX,
    Flags,
    Frame,
    FrameDecoder,
    MessageType,
    OversizeFrame,
    encode_frame,
)
from kata_ipu.ttrpc.metadata import Metadata
from kata_ipu.ttrpc.streams import ClientStream
from kata_ipu.ttrpc.wire import Request, decode_response, encode_request

log = logging.getLogger("kata_ipu.ttrpc.client")

_MAX_STREAM_ID = (1 << 32) - 1


class Runstate(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSED = "closed"


M = TypeVar("M")
M_co = TypeVar("M_co", covariant=True)


class Message(Protocol):
    """What ttrpc needs of a protobuf message class (google.protobuf satisfies it)."""

    def SerializeToString(self) -> bytes: ...


class MessageParser(Protocol[M_co]):
    """A protobuf message class: ``Cls.FromString(bytes) -> Cls``."""

    def FromString(self, data: bytes, /) -> M_co: ...


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self._client = client
        self._decoder = FrameDecoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._client._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except Exception as exc:  # pragma: no cover - the decoder only raises on bugs
            self._client._fail_all(ProtocolError(f"ttrpc: undecodable stream: {exc}"))
            return
        for frame in frames:
            self._client._on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._on_lost(exc)

    def pause_writing(self) -> None:
        self._client._writable.clear()

    def resume_writing(self) -> None:
        self._client._writable.set()


class Client:
    """A ttrpc connection. Create with :meth:`connect` (or ``async with``)."""

    def __init__(self) -> None:
        self.runstate = Runstate.IDLE
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Frame | OversizeFrame]] = {}
        self._streams: dict[int, ClientStream] = {}
        self._next_id = 1
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.Event()
        self._close_reason: KataIpuError | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def connect(cls, address: str | Address, *, timeout: float | None = 10.0) -> Client:
        """Dial ``unix:///path``, a bare path or ``tcp://HOST:PORT``."""
        addr = parse_address(address) if isinstance(address, str) else address
        client = cls()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if isinstance(addr, UnixAddress):
                    await loop.create_unix_connection(lambda: _Protocol(client), addr.path)
                else:
                    assert isinstance(addr, TcpAddress)
                    transport, _ = await loop.create_connection(
                        lambda: _Protocol(client), addr.host, addr.port
                    )
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"ttrpc: connect to {addr} timed out") from exc
        except OSError as exc:
            raise ConnectionClosed(f"ttrpc: cannot connect to {addr}") from exc
        client.runstate = Runstate.RUNNING
        return client

    async def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionClosed. Idempotent."""
        if self._transport is not None and self.runstate is Runstate.RUNNING:
            self._transport.close()
        if self.runstate is Runstate.RUNNING:
            await self._closed.wait()
        self.runstate = Runstate.CLOSED

    @property
    def closed(self) -> bool:
        return self.runstate is Runstate.CLOSED

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ calls
    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bytes:
        """One unary call; returns the response payload bytes."""
        if self.runstate is not Runstate.RUNNING or self._transport is None:
            raise self._close_reason or ConnectionClosed()
        deadline = None if timeout is None else time.monotonic() + timeout
        sid = self._next_id
        if sid > _MAX_STREAM_ID:
            raise ResourceExhausted("ttrpc: stream ids exhausted on this connection")
        self._next_id = sid + 2
        body = encode_request(Request(
            service, method, payload,
            max(1, int(timeout * 1e9)) if timeout is not None else 0,
            metadata.pairs if metadata is not None else (),
        ))
        if len(body) > MESSAGE_LENGTH_MAX:
            raise OversizedMessage(len(body), MESSAGE_LENGTH_MAX)
        fut: asyncio.Future[Frame | OversizeFrame] = self._loop.create_future()
        self._pending[sid] = fut
        try:
            if not self._writable.is_set():
                await self._writable.wait()
            self._transport.write(encode_frame(sid, MessageType.REQUEST, 0, body))
            if deadline is None:
                frame = await fut
            else:
                try:
                    async with asyncio.timeout_at(_loop_deadline(deadline)):
                        frame = await fut
                except TimeoutError:
                    raise DeadlineExceeded("context deadline exceeded") from None
        finally:
            self._pending.pop(sid, None)
        if isinstance(frame, OversizeFrame):
            raise OversizedMessage(frame.length, MESSAGE_LENGTH_MAX)
        if frame.type != MessageType.RESPONSE:
            raise ProtocolError("unknown message type received")
        resp = decode_response(frame.data)
        if resp.status is not None and resp.status.code != 0:
            err = error_for_code(resp.status.code, resp.status.message)
            err.details = resp.status.details  # type: ignore[attr-defined]
            raise err
        return resp.payload

    async def call_message(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: MessageParser[M],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        """A unary call with protobuf messages in and out."""
        data = await self.call(service, method, request.SerializeToString(),
                               timeout=timeout, metadata=metadata)
        return response_type.FromString(data)

    async def stream(
        self,
        service: str,
        method: str,
        request: bytes | None = None,
        *,
        client_streaming: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ClientStream:
        """Open a ttrpc v1.2 stream (see :mod:`kata_ipu.ttrpc.streams`).

        ``request`` is the first message (the whole request of a server-streaming method);
        with ``client_streaming`` the stream stays open for :meth:`ClientStream.send` until
        :meth:`ClientStream.close_send`. ``timeout`` bounds the whole stream.
        """
        if self.runstate is not Runstate.RUNNING or self._transport is None:
            raise self._close_reason or ConnectionClosed()
        sid = self._next_id
        if sid > _MAX_STREAM_ID:
            raise ResourceExhausted("ttrpc: stream ids exhausted on this connection")
        self._next_id = sid + 2
        flags = Flags.REMOTE_OPEN if client_streaming else Flags.REMOTE_CLOSED
        if request is None:
            flags |= Flags.NO_DATA
        body = encode_request(Request(
            service, method, request or b"",
            max(1, int(timeout * 1e9)) if timeout is not None else 0,
            metadata.pairs if metadata is not None else (),
        ))
        if len(body) > MESSAGE_LENGTH_MAX:
            raise OversizedMessage(len(body), MESSAGE_LENGTH_MAX)

        async def send(data_flags: int, data: bytes) -> None:
            if self.runstate is not Runstate.RUNNING or self._transport is None:
                raise self._close_reason or ConnectionClosed()
            if len(data) > MESSAGE_LENGTH_MAX:
                raise OversizedMessage(len(data), MESSAGE_LENGTH_MAX)
            if not self._writable.is_set():
                await self._writable.wait()
            self._transport.write(encode_frame(sid, MessageType.DATA, data_flags, data))

        stream = ClientStream(sid, send, self._release_stream, client_streaming)
        self._streams[sid] = stream
        if timeout is not None:
            timer = self._loop.call_later(
                timeout, stream._fail, DeadlineExceeded("context deadline exceeded"))
            stream._timer = timer
        if not self._writable.is_set():
            await self._writable.wait()
        self._transport.write(encode_frame(sid, MessageType.REQUEST, flags, body))
        return stream

    def _release_stream(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        if stream is not None and stream._timer is not None:
            stream._timer.cancel()

    # ------------------------------------------------------------------ protocol callbacks
    def _on_frame(self, frame: Frame | OversizeFrame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is not None:
            if isinstance(frame, OversizeFrame):
                stream._fail(OversizedMessage(frame.length, MESSAGE_LENGTH_MAX))
            elif frame.type == MessageType.DATA:
                stream._data(frame.flags, frame.data)
            elif frame.type == MessageType.RESPONSE:
                try:
                    resp = decode_response(frame.data)
                except ProtocolError as exc:
                    stream._fail(exc)
                    return
                if resp.status is not None and resp.status.code != 0:
                    stream._fail(error_for_code(resp.status.code, resp.status.message))
                else:
                    stream._response(resp.payload)
            return
        fut = self._pending.get(frame.stream_id)
        if fut is None or fut.done():
            log.debug("ttrpc: frame for unknown stream %d dropped", frame.stream_id)
            return
        fut.set_result(frame)

    def _fail_all(self, error: KataIpuError) -> None:
        self._close_reason = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(type(error)(error.message))
        self._pending.clear()
        for stream in list(self._streams.values()):
            stream._fail(type(error)(error.message))
        if self._transport is not None:
            self._transport.close()

    def _on_lost(self, exc: Exception | None) -> None:
        err = ConnectionClosed()
        if exc is not None:
            err.__cause__ = exc
        if self._close_reason is None:
            self._close_reason = err
        for fut in self._pending.values():
            if not fut.done():
                per_call = ConnectionClosed(self._close_reason.message)
                per_call.__cause__ = exc
                fut.set_exception(per_call)
        self._pending.clear()
        for stream in list(self._streams.values()):
            stream._fail(ConnectionClosed(self._close_reason.message))
        self.runstate = Runstate.CLOSED
        self._writable.set()
        self._closed.set()


def _loop_deadline(deadline: float) -> float:
    """Convert a time.monotonic() deadline to the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
