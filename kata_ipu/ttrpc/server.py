"""asyncio ttrpc server: registered services, concurrent handlers, graceful shutdown.

Lifecycle (guarded by :class:`Runstate`)::

    IDLE ──listen()──▶ SERVING ──shutdown()──▶ STOPPING ──(in-flight calls done)──▶ STOPPED
                         └────────────close()──────────────────────────────────────▶ STOPPED

Per connection, every Request frame is answered on its own stream id, each in its own task, so
slow calls never block fast ones. The rules follow containerd/ttrpc (Go) so that containerd,
its shims and Go clients see identical behaviour:

* unknown service / method  → UNIMPLEMENTED ``service X`` / ``method X``
* undecodable envelope      → INVALID_ARGUMENT ``unmarshal request error: ...``
* frame over 4 MiB          → body discarded, RESOURCE_EXHAUSTED on that stream, connection kept
* even stream id            → INVALID_ARGUMENT ``StreamID must be odd for client initiated streams``
* stream id not increasing  → INVALID_ARGUMENT ``StreamID cannot be re-used and must increment``
* ``timeout_nano``          → the handler is cancelled at the deadline; DEADLINE_EXCEEDED
* handler exception         → code from the one table in :func:`kata_ipu.errors.code_for`
* other frame types (v1.2 Data) are ignored, as the v1.1 server does.

When a connection drops, its in-flight handlers are cancelled (Go cancels their context).

Size (over ~400 lines): the connection protocol, the call tasks and the listener share the
server's run state (in-flight calls, shutdown); wire, frame, streams, metadata and address are
separate modules already.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import contextvars
import enum
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from kata_ipu.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    KataIpuError,
    code_for,
)
from kata_ipu.osutil.unixsock import PathState, clear_stale_socket, peer_credentials
from kata_ipu.ttrpc.address import Address, TcpAddress, UnixAddress, parse_address
from kata_ipu.ttrpc.errors import ConnectionClosed, OversizedMessage, WireError
from kata_ipu.ttrpc.frame import (
    MESSAGE_LENGTH_MAX,
    Flags,
    FrameDecoder,
    MessageType,
    OversizeFrame,
    encode_frame,
)
from kata_ipu.ttrpc.metadata import Metadata
from kata_ipu.ttrpc.streams import ServerStream, StreamMethod
from kata_ipu.ttrpc.wire import Response, Status, decode_request, encode_response

log = logging.getLogger("kata_ipu.ttrpc.server")


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call."""

    service: str
    method: str
    stream_id: int
    metadata: Metadata
    timeout: float | None  # seconds remaining when the request arrived, None if unbounded
    peer_uid: int | None  # SO_PEERCRED uid on unix sockets

    @property
    def full_method(self) -> str:
        return f"/{self.service}/{self.method}"


Handler = Callable[[CallContext, bytes], Awaitable[bytes]]


class Runstate(enum.Enum):
    IDLE = "idle"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._last_id = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.peer_uid: int | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()  # protocol factories run inside the loop
        self._streams: dict[int, ServerStream] = {}
        self._calls: dict[int, _Call] = {}
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            uid = peer_credentials(sock).uid
            self.peer_uid = uid
            if self._server.require_same_uid and uid != os.getuid():
                log.warning("ttrpc: refusing connection from uid %d", uid)
                transport.abort()
                return
        elif sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            sid = frame.stream_id
            if isinstance(frame, OversizeFrame):
                self._reply_status(sid, Code.RESOURCE_EXHAUSTED,
                                   f"message length {frame.length} exceed maximum message "
                                   f"size of {MESSAGE_LENGTH_MAX}")
                continue
            if frame.type == MessageType.DATA:
                self._on_data(sid, frame.flags, frame.data)
                continue
            if frame.type != MessageType.REQUEST:
                continue  # unknown frame types are ignored, as the Go server does
            if sid % 2 == 0:
                self._reply_status(sid, Code.INVALID_ARGUMENT,
                                   "StreamID must be odd for client initiated streams")
                continue
            if sid <= self._last_id:
                self._reply_status(sid, Code.INVALID_ARGUMENT,
                                   "StreamID cannot be re-used and must increment")
                continue
            self._last_id = sid
            if self._server.runstate is not Runstate.SERVING:
                self._reply_status(sid, Code.UNAVAILABLE, "ttrpc: server shutdown")
                continue
            self._dispatch(sid, frame.flags, frame.data)

    def _forget_call(self, sid: int, _task: object) -> None:
        self._calls.pop(sid, None)

    def _on_data(self, sid: int, flags: int, data: bytes) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            self._reply_status(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
            return
        try:
            stream._feed(flags, data)
        except KataIpuError as exc:
            self._streams.pop(sid, None)
            call = self._calls.get(sid)
            if call is not None and call.task is not None:
                call.task.cancel()
            self._reply_status(sid, exc.code, str(exc))

    def _dispatch(self, sid: int, flags: int, data: bytes) -> None:
        """Decode and resolve synchronously, then run the handler (eagerly if allowed)."""
        try:
            req = decode_request(data)
        except WireError as exc:
            self._reply_status(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        service = self._server._services.get(req.service)
        if service is None:
            self._reply_status(sid, Code.UNIMPLEMENTED, f"service {req.service}")
            return
        handler = service.methods.get(req.method)
        if handler is None:
            self._reply_status(sid, Code.UNIMPLEMENTED, f"method {req.method}")
            return
        timeout = req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        call = _Call(CallContext(req.service, req.method, sid, Metadata(req.metadata),
                                 timeout, self.peer_uid))
        coro: Coroutine[Any, Any, Any]
        if isinstance(handler, StreamMethod):
            # A v1.1 (unary) request to a stream method carries one message and closes.
            unary_req = not flags & (Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED)
            initial = None if flags & Flags.NO_DATA or (
                flags & Flags.REMOTE_OPEN and not req.payload) else req.payload
            stream = ServerStream(functools.partial(self._send_data, sid), sid, initial,
                                  remote_closed=unary_req or not flags & Flags.REMOTE_OPEN)
            self._streams[sid] = stream
            coro = self._run_stream(call, handler, stream)
        else:
            coro = self._run(call, handler, req.payload)
        if service.eager:
            # Run the first step inline: most calls finish without suspending, which saves a
            # task and an event-loop iteration (Python 3.12's eager tasks, by hand). The step
            # runs in its own context copy, which the task then keeps, so context variables
            # behave as in a task. Only for services registered eager=True, because inside
            # that first step there is no current task (asyncio.timeout() would fail).
            ctx = contextvars.copy_context()
            try:
                first = ctx.run(coro.send, None)
            except StopIteration:
                return
            task = self._loop.create_task(_Resumed(coro, first), context=ctx)
        else:
            task = self._loop.create_task(coro)
        call.task = task
        self._calls[sid] = call
        task.add_done_callback(functools.partial(self._forget_call, sid))
        self._tasks.add(task)
        self._server._inflight_add(task)
        task.add_done_callback(self._tasks.discard)
        if timeout is not None:
            call.timer = self._loop.call_later(timeout, call.expire)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self._server._connections.discard(self)
        for task in self._tasks:
            task.cancel()

    def pause_writing(self) -> None:
        # Backpressure: stop reading requests while the peer is not reading responses.
        self._writable.clear()
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    # -- calls
    def _send(self, sid: int, body: bytes) -> None:
        if self._transport is None or self.closed or self._transport.is_closing():
            return
        if len(body) > MESSAGE_LENGTH_MAX:
            body = encode_response(Response(Status(
                Code.RESOURCE_EXHAUSTED,
                f"message length {len(body)} exceed maximum message size of "
                f"{MESSAGE_LENGTH_MAX}",
            )))
        self._transport.write(encode_frame(sid, MessageType.RESPONSE, 0, body))

    def _reply_status(self, sid: int, code: Code, message: str) -> None:
        self._send(sid, encode_response(Response(Status(int(code), message))))

    async def _send_data(self, sid: int, flags: int, data: bytes) -> None:
        if self.closed or self._transport is None:
            raise ConnectionClosed()
        if len(data) > MESSAGE_LENGTH_MAX:
            raise OversizedMessage(len(data), MESSAGE_LENGTH_MAX)
        if not self._writable.is_set():
            await self._writable.wait()
        self._transport.write(encode_frame(sid, MessageType.DATA, flags, data))

    async def _run_stream(self, call: _Call, method: StreamMethod,
                          stream: ServerStream) -> None:
        sid = call.ctx.stream_id

        async def handler(ctx: CallContext, _payload: bytes) -> bytes:
            result = await method.handler(ctx, stream)
            return result or b""

        try:
            if method.server_streaming:
                ok = await self._run(call, handler, b"", reply=False)
                if ok:
                    self._transport_write(sid, MessageType.DATA,
                                          Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")
            else:
                await self._run(call, handler, b"")
        finally:
            self._streams.pop(sid, None)

    def _transport_write(self, sid: int, mtype: int, flags: int, data: bytes) -> None:
        if self._transport is not None and not self.closed and not self._transport.is_closing():
            self._transport.write(encode_frame(sid, mtype, flags, data))

    async def _run(self, call: _Call, handler: Handler, payload: bytes, *,
                   reply: bool = True) -> bool:
        ctx = call.ctx
        try:
            result = await handler(ctx, payload)
        except asyncio.CancelledError:
            if call.expired:  # we cancelled it at the deadline (timeout_nano)
                self._reply_status(ctx.stream_id, Code.DEADLINE_EXCEEDED,
                                   "context deadline exceeded")
                return False
            raise  # connection gone or server closing: nobody to answer
        except KataIpuError as exc:
            log.debug("ttrpc: %s failed: %s", ctx.full_method, exc)
            self._reply_status(ctx.stream_id, exc.code, str(exc))
            return False
        except Exception as exc:
            code = code_for(exc)
            if code is Code.UNKNOWN:
                log.exception("ttrpc: %s raised", ctx.full_method)
            self._reply_status(ctx.stream_id, code, str(exc) or type(exc).__name__)
            return False
        finally:
            if call.timer is not None:
                call.timer.cancel()
        if reply:
            self._send(ctx.stream_id, encode_response(Response(None, result)))
        return True

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _Call:
    """One in-flight request: its context, its task and its deadline timer."""

    __slots__ = ("ctx", "expired", "task", "timer")

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.task: asyncio.Task[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        if self.task is not None:
            self.task.cancel()


@dataclass(frozen=True, slots=True)
class _Service:
    methods: dict[str, Handler | StreamMethod]
    eager: bool


class _Resumed(collections.abc.Coroutine[Any, Any, Any]):
    """Hands a coroutine that already ran its first step (eagerly) over to a Task.

    The Task's first ``send(None)`` returns the future that step was waiting on, so the Task
    waits on it; every later ``send``/``throw``/``close`` goes straight to the coroutine. A
    cancellation that arrives before the Task ever ran is thrown into the coroutine at its
    await, exactly as if it had been a task from the start.
    """

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first
        self._started = False

    def send(self, value: Any) -> Any:
        if not self._started:
            self._started = True
            return self._first
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._started = True
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover - legacy signature

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:  # pragma: no cover - Task drives it
        raise TypeError("_Resumed is driven by a Task, not awaited")


class _DuplexPipe(asyncio.Transport):
    """One bidirectional transport over a read pipe and a write pipe (two fds on a
    virtio-serial port, a pair of pipes...), for :meth:`Server.serve_pipe`."""

    def __init__(self, conn: _Connection, done: asyncio.Future[None]) -> None:
        super().__init__()
        self._conn = conn
        self._done = done
        self._rt: asyncio.ReadTransport | None = None
        self._wt: asyncio.WriteTransport | None = None
        self._lost = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._wt is not None and not self._lost:
            self._wt.write(data)

    def is_closing(self) -> bool:
        return self._lost

    def close(self) -> None:
        self.lose(None)

    def abort(self) -> None:
        self.lose(None)

    def pause_reading(self) -> None:
        if self._rt is not None and not self._lost:
            self._rt.pause_reading()

    def resume_reading(self) -> None:
        if self._rt is not None and not self._lost:
            self._rt.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        for t in (self._rt, self._wt):
            if t is not None:
                t.close()
        self._conn.connection_lost(exc)
        if not self._done.done():
            self._done.set_result(None)


class _PipeReader(asyncio.Protocol):
    def __init__(self, duplex: _DuplexPipe, conn: _Connection) -> None:
        self._duplex = duplex
        self._conn = conn

    def data_received(self, data: bytes) -> None:
        self._conn.data_received(data)

    def eof_received(self) -> bool | None:
        self._duplex.lose(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._duplex.lose(exc)


class _PipeWriter(asyncio.BaseProtocol):
    def __init__(self, duplex: _DuplexPipe, conn: _Connection) -> None:
        self._duplex = duplex
        self._conn = conn

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._duplex.lose(exc)


class Server:
    """A ttrpc server. Register services, then :meth:`listen` on one or more addresses."""

    def __init__(self, *, require_same_uid: bool = False) -> None:
        self.runstate = Runstate.IDLE
        self.require_same_uid = require_same_uid
        self._services: dict[str, _Service] = {}
        self._listeners: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[_Connection] = set()
        self._inflight: set[asyncio.Task[Any]] = set()

    def register(self, service: str, methods: Mapping[str, Handler | StreamMethod], *,
                 eager: bool = False) -> None:
        """Register a fully qualified service (``pkg.Service``) and its method handlers.

        ``eager=True`` runs each handler inline until its first suspension (saving a task and
        a loop iteration per call); its handlers must not need ``asyncio.current_task()``
        (e.g. ``asyncio.timeout()``) before their first ``await``.
        """
        if service in self._services:
            raise AlreadyExists(f"ttrpc: service {service} already registered")
        self._services[service] = _Service(dict(methods), eager)

    @property
    def addresses(self) -> list[Address]:
        out: list[Address] = []
        for srv in self._listeners:
            for sock in srv.sockets:
                name = sock.getsockname()
                if sock.family == socket.AF_UNIX:
                    out.append(UnixAddress(name if isinstance(name, str) else name.decode()))
                else:
                    out.append(TcpAddress(name[0], name[1]))
        return out

    async def listen(self, address: str | Address | UnixListener, *,
                     mode: int = 0o600) -> Address:
        """Start serving on an address; returns the bound address (TCP port 0 resolved).

        A unix socket is created with ``mode`` before it accepts connections; a stale socket
        file nobody listens on is replaced, a live one is refused. A :class:`UnixListener`
        is served as it is (peers already queued on it are served first).
        """
        if self.runstate in (Runstate.STOPPING, Runstate.STOPPED):
            raise FailedPrecondition(f"ttrpc: server is {self.runstate.value}")
        loop = asyncio.get_running_loop()
        if isinstance(address, UnixListener):
            addr: Address = UnixAddress(address.path)
        else:
            addr = parse_address(address) if isinstance(address, str) else address
        if isinstance(addr, UnixAddress):
            sock = (address.take() if isinstance(address, UnixListener)
                    else _bind_unix(addr.path, mode))
            srv = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
            self._unix_paths.append(addr.path)
            bound: Address = addr
        else:
            srv = await loop.create_server(lambda: _Connection(self), addr.host, addr.port,
                                           reuse_address=True)
            name = srv.sockets[0].getsockname()
            bound = TcpAddress(name[0], name[1])
        self._listeners.append(srv)
        self.runstate = Runstate.SERVING
        log.info("ttrpc: listening", extra={"address": str(bound)})
        return bound

    async def serve_pipe(self, read_file: IO[bytes], write_file: IO[bytes]) -> None:
        """Serve one connection over a pair of already-open files (pipes or character
        devices, e.g. both ends of a virtio-serial port); returns when the peer hangs up (EOF)
        or the server closes. The files are closed on return.

        This is how a guest agent serves ttrpc without a socket: Kata's agent listens on
        vsock, but a virtio-serial port is a character device.
        """
        if self.runstate in (Runstate.STOPPING, Runstate.STOPPED):
            raise FailedPrecondition(f"ttrpc: server is {self.runstate.value}")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        conn = _Connection(self)
        duplex = _DuplexPipe(conn, done)
        try:
            # writer first, then the connection, then the reader: a request already waiting in
            # the pipe must find the connection made and able to answer
            duplex._wt, _ = await loop.connect_write_pipe(
                lambda: _PipeWriter(duplex, conn), write_file)
            self.runstate = Runstate.SERVING
            conn.connection_made(duplex)
            duplex._rt, _ = await loop.connect_read_pipe(
                lambda: _PipeReader(duplex, conn), read_file)
        except BaseException:
            duplex.lose(None)
            read_file.close()
            write_file.close()
            raise
        await done

    def _inflight_add(self, task: asyncio.Task[Any]) -> None:
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight calls finish (up to ``timeout``), then close."""
        if self.runstate is Runstate.STOPPED:
            return
        self.runstate = Runstate.STOPPING
        self._stop_listening()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)
        await self.close()

    async def close(self) -> None:
        """Stop at once: cancel in-flight calls and drop every connection. Idempotent."""
        self._stop_listening()
        for conn in list(self._connections):
            conn.abort()
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        for srv in self._listeners:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        self._listeners.clear()
        self.runstate = Runstate.STOPPED

    def _stop_listening(self) -> None:
        for srv in self._listeners:
            srv.close()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths.clear()


class UnixListener:
    """A unix socket that listens before a :class:`Server` serves it.

    Lifecycle: bound and listening at construction (peers that connect wait in the kernel's
    backlog) -> :meth:`publish` renames it to its final path (``rename(2)`` keeps a
    listening socket listening, so a socket can be made before its name is known) ->
    :meth:`Server.listen` serves it and owns it from then on. :meth:`close` (idempotent)
    removes a listener no server took.
    """

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = path
        self._sock: socket.socket | None = _bind_unix(path, mode)

    def publish(self, path: str) -> None:
        """Move to ``path``, replacing whatever socket file is there (a dead server's)."""
        if self._sock is None:
            raise FailedPrecondition(f"ttrpc: listener {self.path} is closed")
        os.rename(self.path, path)
        self.path = path

    def take(self) -> socket.socket:
        sock, self._sock = self._sock, None
        if sock is None:
            raise FailedPrecondition(f"ttrpc: listener {self.path} is closed")
        return sock

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _bind_unix(path: str, mode: int) -> socket.socket:
    state = clear_stale_socket(path)
    if state is PathState.NOT_A_SOCKET:
        raise InvalidArgument(f"ttrpc: {path} exists and is not a socket")
    if state is PathState.SERVING:
        raise AlreadyExists(f"ttrpc: {path} is in use by another server")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Nobody can connect before listen(), so the mode is in place before the first peer.
        os.chmod(path, mode)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return sock
