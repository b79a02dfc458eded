"""Wire compatibility with containerd's Go ttrpc (Debian's v1.1.1), in both directions.

Python client -> Go server and Go client -> Python server: unary success, error codes,
unknown service/method wording, metadata with repeated keys, deadlines, 200 concurrent calls,
oversize frames, and a connection that drops mid-call.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from google.protobuf import wrappers_pb2

from kata_ipu import errors
from kata_ipu.testing.prereq import require_programs
from kata_ipu.ttrpc import CallContext, Client, ConnectionClosed, Metadata, Server, unary
from tests.support.gopeer import build_goecho

SERVICE = "test.echo.v1.Echo"


@pytest.fixture(scope="module")
def goecho() -> Path:
    require_programs("go")
    return build_goecho()


@pytest.fixture
def go_server(goecho: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    sock = str(tmp_path / "go.sock")
    proc = subprocess.Popen([str(goecho), "server", "-socket", sock], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield sock, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
async def go_client(go_server: tuple[str, subprocess.Popen[str]]) -> AsyncIterator[Client]:
    client = await Client.connect(f"unix://{go_server[0]}")
    yield client
    await client.close()


def sv(value: str) -> bytes:
    return wrappers_pb2.StringValue(value=value).SerializeToString()


def parse_sv(data: bytes) -> str:
    return wrappers_pb2.StringValue.FromString(data).value


# ----------------------------------------------------------------- Python client -> Go server

async def test_py_client_unary_echo(go_client: Client) -> None:
    assert parse_sv(await go_client.call(SERVICE, "Echo", sv("hi"))) == "hi"


async def test_py_client_typed_call(go_client: Client) -> None:
    resp = await go_client.call_message(SERVICE, "Echo", wrappers_pb2.StringValue(value="typed"),
                                        wrappers_pb2.StringValue)
    assert resp.value == "typed"


@pytest.mark.parametrize(("code", "cls"), [
    (5, errors.NotFound), (3, errors.InvalidArgument), (9, errors.FailedPrecondition),
    (14, errors.Unavailable), (8, errors.ResourceExhausted), (16, errors.Unauthenticated),
])
async def test_py_client_error_codes(go_client: Client, code: int,
                                     cls: type[errors.KataIpuError]) -> None:
    with pytest.raises(cls) as info:
        await go_client.call(SERVICE, "Fail", sv(f"{code}:went wrong {code}"))
    assert info.value.code == code
    assert str(info.value) == f"went wrong {code}"


async def test_py_client_unknown_method_and_service(go_client: Client) -> None:
    with pytest.raises(errors.Unimplemented, match=r"^method Nope$"):
        await go_client.call(SERVICE, "Nope", b"")
    with pytest.raises(errors.Unimplemented, match=r"^service test\.missing\.v1\.Svc$"):
        await go_client.call("test.missing.v1.Svc", "Echo", b"")


async def test_py_client_metadata_repeated_keys_and_deadline(go_client: Client) -> None:
    md = Metadata([("k", "v1"), ("solo", "x"), ("k", "v2")])
    seen = json.loads(parse_sv(await go_client.call(SERVICE, "Meta", b"", metadata=md,
                                                    timeout=30.0)))
    assert seen["md"] == {"k": ["v1", "v2"], "solo": ["x"]}
    # timeout_nano arrived as the remaining time: the Go handler saw a deadline ~30 s out.
    assert 20_000 < seen["deadline_ms"] <= 30_000


async def test_py_client_no_deadline_sends_none(go_client: Client) -> None:
    seen = json.loads(parse_sv(await go_client.call(SERVICE, "Meta", b"")))
    assert "deadline_ms" not in seen


async def test_py_client_deadline_exceeded(go_client: Client) -> None:
    ms = wrappers_pb2.Int64Value(value=5000).SerializeToString()
    with pytest.raises(errors.DeadlineExceeded):
        await go_client.call(SERVICE, "Sleep", ms, timeout=0.2)
    # the connection is still usable afterwards, and late replies are dropped cleanly
    assert parse_sv(await go_client.call(SERVICE, "Echo", sv("still here"))) == "still here"


async def test_py_client_200_concurrent_calls(go_client: Client) -> None:
    async def one(i: int) -> str:
        return parse_sv(await go_client.call(SERVICE, "Echo", sv(f"call-{i}")))

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results == [f"call-{i}" for i in range(200)]


async def test_py_client_oversize_response_keeps_connection(go_client: Client) -> None:
    # Go v1.1.1 sends a 5 MiB response frame; the client discards it, fails only that call
    # with RESOURCE_EXHAUSTED and keeps the connection in sync.
    big = wrappers_pb2.Int64Value(value=5 << 20).SerializeToString()
    with pytest.raises(errors.ResourceExhausted, match="exceed maximum message size"):
        await go_client.call(SERVICE, "Big", big)
    assert parse_sv(await go_client.call(SERVICE, "Echo", sv("after"))) == "after"


async def test_py_client_oversize_request_refused_locally(go_client: Client) -> None:
    with pytest.raises(errors.ResourceExhausted):
        await go_client.call(SERVICE, "Echo", sv("x" * (5 << 20)))
    assert parse_sv(await go_client.call(SERVICE, "Echo", sv("ok"))) == "ok"


async def test_py_client_connection_drop_fails_pending_calls(
    go_server: tuple[str, subprocess.Popen[str]], go_client: Client
) -> None:
    ms = wrappers_pb2.Int64Value(value=60_000).SerializeToString()
    pending = [asyncio.ensure_future(go_client.call(SERVICE, "Sleep", ms)) for _ in range(5)]
    await asyncio.sleep(0.2)
    go_server[1].kill()
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
    assert all(isinstance(r, ConnectionClosed) for r in results), results
    with pytest.raises(ConnectionClosed):
        await go_client.call(SERVICE, "Echo", sv("x"))


# ----------------------------------------------------------------- Go client -> Python server

class _PyEcho:
    def __init__(self) -> None:
        self.cancelled_by_deadline = asyncio.Event()
        self.hang_entered = asyncio.Event()
        self.server: Server | None = None

    async def echo(self, ctx: CallContext, req: wrappers_pb2.StringValue
                   ) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value=req.value)

    async def fail(self, ctx: CallContext, req: wrappers_pb2.StringValue
                   ) -> wrappers_pb2.StringValue:
        raise errors.NotFound("nope")

    async def meta(self, ctx: CallContext, req: wrappers_pb2.StringValue
                   ) -> wrappers_pb2.StringValue:
        md: dict[str, list[str]] = {}
        for k, v in ctx.metadata:
            md.setdefault(k, []).append(v)
        return wrappers_pb2.StringValue(value=json.dumps({"md": md, "timeout": ctx.timeout}))

    async def sleep(self, ctx: CallContext, req: wrappers_pb2.Int64Value
                    ) -> wrappers_pb2.StringValue:
        try:
            await asyncio.sleep(req.value / 1000)
        except asyncio.CancelledError:
            self.cancelled_by_deadline.set()
            raise
        return wrappers_pb2.StringValue(value="slept")

    async def hang(self, ctx: CallContext, req: wrappers_pb2.StringValue
                   ) -> wrappers_pb2.StringValue:
        self.hang_entered.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def test_go_client_against_python_server(goecho: Path, tmp_path: Path) -> None:
    impl = _PyEcho()
    server = Server()
    server.register(SERVICE, {
        "Echo": unary(wrappers_pb2.StringValue, impl.echo),
        "Fail": unary(wrappers_pb2.StringValue, impl.fail),
        "Meta": unary(wrappers_pb2.StringValue, impl.meta),
        "Sleep": unary(wrappers_pb2.Int64Value, impl.sleep),
        "Hang": unary(wrappers_pb2.StringValue, impl.hang),
    })
    sock = str(tmp_path / "py.sock")
    await server.listen(f"unix://{sock}")

    async def drop_on_hang() -> None:
        await impl.hang_entered.wait()
        await server.close()  # the Go client's in-flight call must fail, not hang

    dropper = asyncio.ensure_future(drop_on_hang())
    proc = await asyncio.create_subprocess_exec(str(goecho), "client", "-socket", sock,
                                                stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    await dropper
    results = {r["name"]: r for r in map(json.loads, out.decode().splitlines())}

    assert results["echo"] == {"name": "echo", "code": 0, "value": "hi"}
    assert (results["fail"]["code"], results["fail"]["msg"]) == (5, "nope")
    assert (results["unknown_method"]["code"], results["unknown_method"]["msg"]) == (
        12, "method Nope")
    assert (results["unknown_service"]["code"], results["unknown_service"]["msg"]) == (
        12, "service test.missing.v1.Svc")
    meta = json.loads(results["metadata"]["value"])
    assert meta["md"] == {"k": ["v1", "v2"], "solo": ["x"]}
    assert 3.0 < meta["timeout"] <= 5.0
    assert results["deadline"]["code"] == 4
    assert impl.cancelled_by_deadline.is_set(), "server did not enforce timeout_nano"
    assert results["concurrent"]["value"] == "200"
    assert results["oversize"]["code"] == 8
    assert "exceed maximum message size of 4194304" in results["oversize"]["msg"]
    assert results["after_oversize"] == {"name": "after_oversize", "code": 0, "value": "after"}
    assert results["dropped"]["code"] != 0
    assert "closed" in results["dropped"]["msg"]
    assert proc.returncode == 0
