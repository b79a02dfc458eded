"""ttrpc v1.2 streaming, Python to Python (Debian's Go peer is v1.1.1, unary only)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kata_ipu import errors
from kata_ipu.ttrpc import (
    CallContext,
    Client,
    ConnectionClosed,
    Server,
    ServerStream,
    StreamMethod,
)
from kata_ipu.ttrpc.frame import Flags, Frame, FrameDecoder, MessageType, encode_frame
from kata_ipu.ttrpc.wire import Request, decode_response, encode_request

SVC = "test.v1.Streams"


async def count(ctx: CallContext, stream: ServerStream) -> bytes | None:
    n = int((await stream.recv() or b"0").decode())
    for i in range(n):
        await stream.send(str(i).encode())
    return None


async def total(ctx: CallContext, stream: ServerStream) -> bytes | None:
    return str(sum([int(m) async for m in stream])).encode()


async def upper(ctx: CallContext, stream: ServerStream) -> bytes | None:
    async for message in stream:
        await stream.send(message.upper())
    return None


async def fail_after_one(ctx: CallContext, stream: ServerStream) -> bytes | None:
    await stream.send(b"first")
    raise errors.NotFound("gone after one")


async def slow(ctx: CallContext, stream: ServerStream) -> bytes | None:
    await asyncio.sleep(3600)
    return None


@pytest.fixture(params=[False, True], ids=["task", "eager"])
async def sock(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    server = Server()
    server.register(SVC, {
        "Count": StreamMethod(count, client_streaming=False, server_streaming=True),
        "Total": StreamMethod(total, client_streaming=True, server_streaming=False),
        "Upper": StreamMethod(upper, client_streaming=True, server_streaming=True),
        "Fail": StreamMethod(fail_after_one, client_streaming=False, server_streaming=True),
        "Slow": StreamMethod(slow, client_streaming=False, server_streaming=True),
    }, eager=request.param)
    path = str(tmp_path / "streams.sock")
    await server.listen(path)
    yield path
    await server.close()


async def test_server_streaming(sock: str) -> None:
    async with await Client.connect(sock) as c:
        stream = await c.stream(SVC, "Count", b"4")
        assert [m async for m in stream] == [b"0", b"1", b"2", b"3"]
        assert await stream.recv() is None


async def test_client_streaming(sock: str) -> None:
    async with await Client.connect(sock) as c:
        stream = await c.stream(SVC, "Total", client_streaming=True)
        for i in range(1, 11):
            await stream.send(str(i).encode())
        await stream.close_send()
        assert await stream.recv() == b"55"
        assert await stream.recv() is None
        with pytest.raises(errors.KataIpuError, match="closed"):
            await stream.send(b"1")


async def test_bidirectional_and_concurrent_streams(sock: str) -> None:
    async with await Client.connect(sock) as c:
        async def one(tag: str) -> list[bytes]:
            stream = await c.stream(SVC, "Upper", client_streaming=True)
            got = []
            for i in range(5):
                await stream.send(f"{tag}{i}".encode())
                got.append(await stream.recv())
            await stream.close_send()
            assert await stream.recv() is None
            return [g for g in got if g is not None]

        results = await asyncio.gather(*(one(t) for t in "abcdefgh"))
        assert results == [[f"{t.upper()}{i}".encode() for i in range(5)] for t in "abcdefgh"]
        assert await c.call(SVC, "Total", b"7") == b"7"  # unary call into a stream method


async def test_error_ends_stream_with_status(sock: str) -> None:
    async with await Client.connect(sock) as c:
        stream = await c.stream(SVC, "Fail", b"")
        assert await stream.recv() == b"first"
        with pytest.raises(errors.NotFound, match="gone after one"):
            await stream.recv()
        assert await stream.recv() is None


async def test_stream_deadline_and_connection_drop(sock: str) -> None:
    async with await Client.connect(sock) as c:
        stream = await c.stream(SVC, "Slow", b"", timeout=0.1)
        with pytest.raises(errors.DeadlineExceeded):
            await stream.recv()
    c2 = await Client.connect(sock)
    stream = await c2.stream(SVC, "Slow", b"")
    await asyncio.sleep(0.05)
    await c2.close()
    with pytest.raises(ConnectionClosed):
        await stream.recv()


def _raw_exchange(path: str, frames: list[bytes], want: int) -> list[Frame]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(5)
    s.sendall(b"".join(frames))
    dec, out = FrameDecoder(), []
    while len(out) < want:
        out.extend(f for f in dec.feed(s.recv(65536)) if isinstance(f, Frame))
    s.close()
    return out


async def test_wire_form_of_a_server_stream(sock: str) -> None:
    req = encode_request(Request(SVC, "Count", b"2"))
    frames = await asyncio.to_thread(
        _raw_exchange, sock, [encode_frame(1, MessageType.REQUEST, Flags.REMOTE_CLOSED, req)], 3)
    assert [(f.stream_id, f.type, f.flags, f.data) for f in frames] == [
        (1, MessageType.DATA, 0, b"0"),
        (1, MessageType.DATA, 0, b"1"),
        (1, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b""),
    ]


async def test_wire_close_with_data_and_buffer_overrun_are_refused(sock: str) -> None:
    open_req = encode_request(Request(SVC, "Total", b""))
    frames = [
        encode_frame(1, MessageType.REQUEST, Flags.REMOTE_OPEN, open_req),
        encode_frame(1, MessageType.DATA, Flags.REMOTE_CLOSED, b"5"),
        encode_frame(3, MessageType.REQUEST, Flags.REMOTE_OPEN,
                     encode_request(Request(SVC, "Slow", b""))),
    ]
    # the Slow handler never reads: 100 messages overrun its 64-message buffer
    frames += [encode_frame(3, MessageType.DATA, 0, b"x")] * 100
    replies = await asyncio.to_thread(_raw_exchange, sock, frames, 3)
    by_id = {}
    for f in replies:  # the first reply per stream (later Data frames find it gone)
        by_id.setdefault(f.stream_id, decode_response(f.data))
    assert by_id[1].status is not None and by_id[1].status.code == 3
    assert by_id[1].status.message == "data close message cannot include data"
    assert by_id[3].status is not None and by_id[3].status.code == 8
