"""Addresses, metadata, the error table, the executor and JSON logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from kata_ipu import errors, log
from kata_ipu.executor import CommandFailed, CommandNotFound, CommandTimeout, Executor
from kata_ipu.ttrpc import Metadata, TcpAddress, UnixAddress, parse_address


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:///run/kata-ipu/ipud.sock", UnixAddress("/run/kata-ipu/ipud.sock")),
    ("/tmp/x.sock", UnixAddress("/tmp/x.sock")),
    ("tcp://127.0.0.1:7000", TcpAddress("127.0.0.1", 7000)),
    ("tcp://[::1]:7000", TcpAddress("::1", 7000)),
])
def test_parse_address(text: str, expected: object) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("unix://relative.sock", "must be absolute"),
    ("tcp://host", "expected tcp://HOST:PORT"),
    ("tcp://host:99999", "bad port"),
    ("http://x:1", "unknown scheme"),
    ("tcp://h:1/path", "unexpected path"),
])
def test_bad_addresses_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=fragment):
        parse_address(text)


def test_tcp_address_renders_ipv6_in_brackets() -> None:
    assert str(TcpAddress("::1", 1)) == "tcp://[::1]:1"


def test_metadata_multimap() -> None:
    md = Metadata.of({"a": ["1", "2"], "b": "3"})
    assert md.get("a") == ["1", "2"] and md.first("b") == "3" and md.get("zz") == []
    assert md.with_values("a", "4").get("a") == ["1", "2", "4"]
    assert md == Metadata([("a", "1"), ("a", "2"), ("b", "3")]) and len(md) == 3


def test_error_for_code_roundtrip() -> None:
    for code in errors.Code:
        if code in (errors.Code.OK, errors.Code.UNKNOWN):
            continue
        err = errors.error_for_code(int(code), "m")
        assert err.code == code and errors.code_for(err) == code
    assert type(errors.error_for_code(99, "m")) is errors.KataIpuError


def test_error_str_keeps_cause() -> None:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            raise errors.ResourceExhausted("pool /var/lib/x is full") from exc
    except errors.ResourceExhausted as err:
        assert str(err) == "pool /var/lib/x is full: [Errno 28] No space left on device"


def test_executor_failures_are_typed() -> None:
    ex = Executor()
    assert ex.run(["sh", "-c", "echo out"]).text == "out\n"
    with pytest.raises(CommandFailed, match="exited with status 3: boom") as info:
        ex.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert info.value.result.returncode == 3
    with pytest.raises(CommandNotFound, match="no-such-program-xyz"):
        ex.run(["no-such-program-xyz"])
    with pytest.raises(CommandTimeout):
        ex.run(["sleep", "5"], timeout=0.1)


async def test_async_executor_kills_child_on_timeout() -> None:
    ex = Executor()
    assert (await ex.arun(["cat"], input=b"in")).stdout == b"in"
    with pytest.raises(CommandTimeout):
        await ex.arun(["sleep", "5"], timeout=0.1)
    with pytest.raises(CommandFailed):
        await ex.arun(["false"])
    task = asyncio.ensure_future(ex.arun(["sleep", "5"]))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
def restore_loggers():  # type: ignore[no-untyped-def]
    saved = {n: (lg.handlers[:], lg.level, lg.propagate) for n in
             ("kata_ipu", "shim_hooks", "guest_hooks") for lg in [logging.getLogger(n)]}
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def test_json_log_lines_carry_context(restore_loggers: None) -> None:
    stream = io.StringIO()
    log.setup(logging.DEBUG, stream)
    logger = logging.getLogger("kata_ipu.test")
    with log.bind(container_id="c1"):
        logger.info("prepared %s", "x", extra={"digest": "sha256:ab"})
    logger.warning("outside")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["msg"] == "prepared x" and lines[0]["level"] == "info"
    assert lines[0]["container_id"] == "c1" and lines[0]["digest"] == "sha256:ab"
    assert "time" in lines[0]
    assert "container_id" not in lines[1]
