"""Python client <-> Python server behaviour, and the server against raw frames on a socket."""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kata_ipu import errors
from kata_ipu.ttrpc import CallContext, Client, ConnectionClosed, Metadata, Server, UnixListener
from kata_ipu.ttrpc.frame import FrameDecoder, encode_frame
from kata_ipu.ttrpc.server import Runstate
from kata_ipu.ttrpc.wire import Request, Response, Status, decode_response, encode_request

SVC = "test.v1.Svc"
CTXVAR: contextvars.ContextVar[bytes] = contextvars.ContextVar("ctxvar", default=b"unset")


class Impl:
    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.cancelled = 0

    async def echo(self, ctx: CallContext, payload: bytes) -> bytes:
        return payload

    async def meta(self, ctx: CallContext, payload: bytes) -> bytes:
        return repr((ctx.metadata.pairs, ctx.timeout is not None)).encode()

    async def block(self, ctx: CallContext, payload: bytes) -> bytes:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b"released"

    async def ctxvar(self, ctx: CallContext, payload: bytes) -> bytes:
        # a context-variable scope that spans a suspension, as kata_ipu.log.bind does
        token = CTXVAR.set(payload)
        try:
            await asyncio.sleep(0.01)
            async with asyncio.timeout(5):  # needs a current task after the first await
                await asyncio.sleep(0)
            return CTXVAR.get()
        finally:
            CTXVAR.reset(token)

    async def big(self, ctx: CallContext, payload: bytes) -> bytes:
        return b"x" * (5 << 20)

    async def raise_(self, ctx: CallContext, payload: bytes) -> bytes:
        kind = payload.decode()
        table: dict[str, BaseException] = {
            "notfound": errors.NotFound("no such thing"),
            "exists": FileExistsError(17, "File exists", "/x"),
            "missing": FileNotFoundError(2, "No such file", "/y"),
            "perm": PermissionError(13, "denied"),
            "timeout": TimeoutError("slow"),
            "notimpl": NotImplementedError("later"),
            "bug": ZeroDivisionError("division by zero"),
        }
        raise table[kind]


@pytest.fixture(params=[False, True], ids=["task", "eager"])
async def served(tmp_path: Path, request: pytest.FixtureRequest
                 ) -> AsyncIterator[tuple[Server, Impl, str]]:
    impl = Impl()
    server = Server()
    server.register(SVC, {"Echo": impl.echo, "Meta": impl.meta, "Block": impl.block,
                          "Big": impl.big, "Raise": impl.raise_, "Ctx": impl.ctxvar},
                    eager=request.param)
    path = str(tmp_path / "s.sock")
    await server.listen(path)
    yield server, impl, path
    impl.release.set()
    await server.close()


@pytest.fixture
async def client(served: tuple[Server, Impl, str]) -> AsyncIterator[Client]:
    c = await Client.connect(served[2])
    yield c
    await c.close()


async def test_socket_mode_is_0600_by_default(served: tuple[Server, Impl, str]) -> None:
    assert stat.S_IMODE(os.stat(served[2]).st_mode) == 0o600


async def test_socket_mode_configurable_and_unlinked_on_close(tmp_path: Path) -> None:
    server = Server()
    path = str(tmp_path / "m.sock")
    await server.listen(f"unix://{path}", mode=0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    await server.shutdown()
    assert not os.path.exists(path)
    assert server.runstate is Runstate.STOPPED


async def test_a_listener_bound_early_serves_the_calls_queued_before_it_was_served(
        tmp_path: Path) -> None:
    """A UnixListener listens from construction: a client that connects and calls before
    any server serves it (and before it is renamed into place) is answered once it is."""
    early, final = str(tmp_path / ".early.sock"), str(tmp_path / "final.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(final)  # a dead server's socket file: publish replaces it
    stale.close()
    listener = UnixListener(early)
    assert stat.S_IMODE(os.stat(early).st_mode) == 0o600
    listener.publish(final)
    assert not os.path.exists(early)
    client = await Client.connect(final)
    call = asyncio.ensure_future(client.call(SVC, "Echo", b"queued", timeout=5))
    await asyncio.sleep(0.05)
    assert not call.done()  # nobody serves yet: the request waits in the socket
    server = Server()
    server.register(SVC, {"Echo": Impl().echo})
    await server.listen(listener)
    assert await call == b"queued"
    await client.close()
    await server.shutdown()
    assert not os.path.exists(final)  # the server owns the renamed socket


async def test_a_listener_no_server_took_is_removed_by_close(tmp_path: Path) -> None:
    listener = UnixListener(str(tmp_path / "l.sock"))
    listener.close()
    listener.close()  # idempotent
    assert not (tmp_path / "l.sock").exists()
    with pytest.raises(errors.FailedPrecondition, match="closed"):
        listener.publish(str(tmp_path / "m.sock"))


async def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening: stale
    s.close()
    first = Server()
    await first.listen(path)
    second = Server()
    with pytest.raises(errors.AlreadyExists, match="in use"):
        await second.listen(path)
    await first.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.InvalidArgument, match="not a socket"):
        await Server().listen(str(tmp_path / "file"))


async def test_echo_and_metadata(client: Client) -> None:
    assert await client.call(SVC, "Echo", b"abc") == b"abc"
    assert await client.call(SVC, "Echo", b"") == b""
    md = Metadata([("a", "1"), ("b", "2"), ("a", "3")])
    seen = await client.call(SVC, "Meta", b"", metadata=md, timeout=5)
    assert seen == repr(((("a", "1"), ("b", "2"), ("a", "3")), True)).encode()
    assert md.get("a") == ["1", "3"]


@pytest.mark.parametrize(("kind", "cls", "message"), [
    ("notfound", errors.NotFound, "no such thing"),
    ("exists", errors.AlreadyExists, "File exists"),
    ("missing", errors.NotFound, "No such file"),
    ("perm", errors.PermissionDenied, "denied"),
    ("timeout", errors.DeadlineExceeded, "slow"),
    ("notimpl", errors.Unimplemented, "later"),
    ("bug", errors.KataIpuError, "division by zero"),
])
async def test_handler_exceptions_map_through_one_table(
    client: Client, kind: str, cls: type[errors.KataIpuError], message: str
) -> None:
    with pytest.raises(cls, match=message) as info:
        await client.call(SVC, "Raise", kind.encode())
    assert type(info.value) is cls
    assert info.value.code == errors.code_for(cls(message))


async def test_context_variables_are_per_call(client: Client) -> None:
    got = await asyncio.gather(*(client.call(SVC, "Ctx", f"v{i}".encode()) for i in range(20)))
    assert got == [f"v{i}".encode() for i in range(20)]
    assert CTXVAR.get() == b"unset"


async def test_unknown_service_and_method(client: Client) -> None:
    with pytest.raises(errors.Unimplemented, match=r"^service nope\.Svc$"):
        await client.call("nope.Svc", "Echo", b"")
    with pytest.raises(errors.Unimplemented, match=r"^method Nope$"):
        await client.call(SVC, "Nope", b"")


async def test_calls_run_concurrently(served: tuple[Server, Impl, str], client: Client) -> None:
    _, impl, _ = served
    blocked = [asyncio.ensure_future(client.call(SVC, "Block", b"")) for _ in range(10)]
    while impl.started < 10:
        await asyncio.sleep(0.01)
    # a fast call completes while ten slow ones are in flight on the same connection
    assert await client.call(SVC, "Echo", b"fast", timeout=5) == b"fast"
    impl.release.set()
    assert await asyncio.gather(*blocked) == [b"released"] * 10


async def test_deadline_enforced_on_both_sides(served: tuple[Server, Impl, str],
                                               client: Client) -> None:
    _, impl, _ = served
    with pytest.raises(errors.DeadlineExceeded):
        await client.call(SVC, "Block", b"", timeout=0.1)
    for _ in range(100):
        if impl.cancelled:
            break
        await asyncio.sleep(0.01)
    assert impl.cancelled == 1, "the server did not cancel the handler at timeout_nano"


async def test_cancelling_the_caller_abandons_only_that_call(
        served: tuple[Server, Impl, str], client: Client) -> None:
    task = asyncio.ensure_future(client.call(SVC, "Block", b""))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await client.call(SVC, "Echo", b"alive") == b"alive"


async def test_connection_drop_fails_all_pending(served: tuple[Server, Impl, str],
                                                 client: Client) -> None:
    server, impl, _ = served
    pending = [asyncio.ensure_future(client.call(SVC, "Block", b"")) for _ in range(5)]
    while impl.started < 5:
        await asyncio.sleep(0.01)
    await server.close()
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, ConnectionClosed) for r in results)
    assert impl.cancelled == 5  # handlers are cancelled with their connection
    with pytest.raises(ConnectionClosed):
        await client.call(SVC, "Echo", b"")


async def test_graceful_shutdown_finishes_in_flight_calls(
        served: tuple[Server, Impl, str], client: Client) -> None:
    server, impl, path = served
    pending = [asyncio.ensure_future(client.call(SVC, "Block", b"")) for _ in range(3)]
    while impl.started < 3:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(server.shutdown(timeout=10))
    await asyncio.sleep(0.05)
    assert server.runstate is Runstate.STOPPING
    assert not os.path.exists(path)  # no new connections
    with pytest.raises(errors.Unavailable, match="shutdown"):
        await client.call(SVC, "Echo", b"", timeout=5)
    impl.release.set()
    assert await asyncio.gather(*pending) == [b"released"] * 3
    await stopping
    assert server.runstate is Runstate.STOPPED


async def test_oversize_response_becomes_resource_exhausted(client: Client) -> None:
    with pytest.raises(errors.ResourceExhausted, match="exceed maximum message size"):
        await client.call(SVC, "Big", b"")
    assert await client.call(SVC, "Echo", b"ok") == b"ok"


async def test_tcp_listener(tmp_path: Path) -> None:
    server = Server()
    server.register(SVC, {"Echo": Impl().echo})
    addr = await server.listen("tcp://127.0.0.1:0")
    assert str(addr).startswith("tcp://127.0.0.1:")
    async with await Client.connect(str(addr)) as c:
        assert await c.call(SVC, "Echo", b"tcp") == b"tcp"
    await server.close()


async def test_connect_refused_is_connection_closed(tmp_path: Path) -> None:
    with pytest.raises(ConnectionClosed, match="cannot connect"):
        await Client.connect(str(tmp_path / "nobody.sock"))


# ----------------------------------------------------------------- raw frames on the socket

class Raw:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(5)
        self.dec = FrameDecoder()

    def send(self, sid: int, body: bytes, mtype: int = 1) -> None:
        self.sock.sendall(encode_frame(sid, mtype, 0, body))

    def recv(self) -> tuple[int, Response]:
        while True:
            frames = self.dec.feed(self.sock.recv(65536))
            if frames:
                f = frames[0]
                assert not hasattr(f, "length")
                return f.stream_id, decode_response(f.data)  # type: ignore[union-attr]

    def close(self) -> None:
        self.sock.close()


def _echo_req(data: bytes) -> bytes:
    return encode_request(Request(SVC, "Echo", data))


async def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(fn, *args)


async def test_raw_oversize_frame_keeps_connection(served: tuple[Server, Impl, str]) -> None:
    raw = Raw(served[2])

    def scenario() -> list[tuple[int, Response]]:
        raw.sock.sendall(struct.pack(">IIBB", 5 << 20, 3, 1, 0) + b"\x00" * (5 << 20))
        first = raw.recv()
        raw.send(5, _echo_req(b"next"))
        return [first, raw.recv()]

    (sid1, r1), (sid2, r2) = await _in_thread(scenario)
    raw.close()
    assert sid1 == 3
    assert r1.status == Status(8, "message length 5242880 exceed maximum message size of 4194304")
    assert (sid2, r2.status, r2.payload) == (5, None, b"next")


async def test_raw_even_and_reused_stream_ids(served: tuple[Server, Impl, str]) -> None:
    raw = Raw(served[2])

    def scenario() -> list[tuple[int, Response]]:
        out = []
        raw.send(2, _echo_req(b"even"))
        out.append(raw.recv())
        raw.send(7, _echo_req(b"seven"))
        out.append(raw.recv())
        raw.send(5, _echo_req(b"backwards"))
        out.append(raw.recv())
        raw.send(9, b"\x0a\x05ab")  # truncated envelope
        out.append(raw.recv())
        raw.send(11, b"data", mtype=3)  # a Data frame for a stream that does not exist
        out.append(raw.recv())
        raw.send(13, b"", mtype=9)  # an unknown frame type: ignored
        raw.send(15, _echo_req(b"last"))
        out.append(raw.recv())
        return out

    replies = await _in_thread(scenario)
    raw.close()
    assert replies[0] == (2, Response(Status(3, "StreamID must be odd for client initiated "
                                                 "streams")))
    assert replies[1] == (7, Response(None, b"seven"))
    assert replies[2] == (5, Response(Status(3, "StreamID cannot be re-used and must "
                                                 "increment")))
    assert replies[3][0] == 9
    assert replies[3][1].status is not None and replies[3][1].status.code == 3
    assert replies[3][1].status.message.startswith("unmarshal request error:")
    assert replies[4] == (11, Response(Status(3, "StreamID is no longer active")))
    assert replies[5] == (15, Response(None, b"last"))


async def test_client_stream_ids_are_odd_and_increasing(tmp_path: Path) -> None:
    seen: list[int] = []

    async def record(ctx: CallContext, payload: bytes) -> bytes:
        seen.append(ctx.stream_id)
        return b""

    server = Server()
    server.register(SVC, {"Rec": record})
    path = str(tmp_path / "ids.sock")
    await server.listen(path)
    async with await Client.connect(path) as c:
        await asyncio.gather(*(c.call(SVC, "Rec", b"") for _ in range(20)))
    await server.close()
    assert sorted(seen) == list(range(1, 41, 2))


async def test_require_same_uid_accepts_own_uid(tmp_path: Path) -> None:
    server = Server(require_same_uid=True)
    server.register(SVC, {"Echo": Impl().echo})
    path = str(tmp_path / "uid.sock")
    await server.listen(path)
    async with await Client.connect(path) as c:
        assert await c.call(SVC, "Echo", b"me") == b"me"
    await server.close()
