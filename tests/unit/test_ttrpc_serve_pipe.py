"""Server.serve_pipe: a ttrpc connection over a pair of pipes (as over a virtio-serial port),
spoken to with raw frames; it ends on EOF and on server close."""

from __future__ import annotations

import asyncio
import os

from kata_ipu.ttrpc import CallContext, Server
from kata_ipu.ttrpc.frame import FrameDecoder, MessageType, encode_frame
from kata_ipu.ttrpc.wire import Request, decode_response, encode_request


async def _echo(_ctx: CallContext, payload: bytes) -> bytes:
    return payload[::-1]


async def _read_frame(fd: int) -> bytes:
    dec = FrameDecoder()
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.run_in_executor(None, os.read, fd, 65536)
        assert data, "EOF before a frame"
        frames = dec.feed(data)
        if frames:
            frame = frames[0]
            assert frame.type == MessageType.RESPONSE  # type: ignore[union-attr]
            return decode_response(frame.data).payload  # type: ignore[union-attr]


async def test_serve_pipe_answers_and_ends_on_eof() -> None:
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    server = Server()
    server.register("t.Echo", {"Echo": _echo})
    task = asyncio.create_task(server.serve_pipe(os.fdopen(req_r, "rb", buffering=0),
                                                 os.fdopen(resp_w, "wb", buffering=0)))
    try:
        for sid, text in ((1, b"abc"), (3, b"hello")):
            os.write(req_w, encode_frame(sid, MessageType.REQUEST, 0,
                                         encode_request(Request("t.Echo", "Echo", text, 0, ()))))
            assert await asyncio.wait_for(_read_frame(resp_r), 10) == text[::-1]
        os.close(req_w)  # the peer hangs up: serve_pipe returns
        await asyncio.wait_for(task, 10)
    finally:
        os.close(resp_r)
        await server.close()


async def test_serve_pipe_ends_when_server_closes() -> None:
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    server = Server()
    task = asyncio.create_task(server.serve_pipe(os.fdopen(req_r, "rb", buffering=0),
                                                 os.fdopen(resp_w, "wb", buffering=0)))
    await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    await server.close()
    await asyncio.wait_for(task, 10)
    os.close(req_w)
    os.close(resp_r)
