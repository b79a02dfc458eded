"""The start hand-off message (shim_hooks.handoff): what the launcher sends, the server reads."""

from __future__ import annotations

import pytest

from shim_hooks import handoff

ARGV = ["/usr/bin/containerd-shim-kata-ipu-v2", "-namespace", "k8s.io", "-id", "c1", "start"]
ENV = {b"PATH": b"/usr/bin", b"TTRPC_ADDRESS": b"/run/c.sock.ttrpc", b"EMPTY": b"",
       b"EQ": b"a=b=c", b"LATIN1": b"caf\xe9"}


def test_round_trip_keeps_argv_environment_and_cwd_byte_for_byte() -> None:
    req = handoff.decode(handoff.encode(ARGV, ENV, b"/run/bundle \xff"))
    assert req.argv == ARGV
    assert {k.encode(): v.encode("utf-8", "surrogateescape") for k, v in req.env.items()} == ENV
    assert req.cwd.encode("utf-8", "surrogateescape") == b"/run/bundle \xff"
    assert req == handoff.decode(handoff.encode(ARGV, ENV, b"/run/bundle \xff"))


@pytest.mark.parametrize(("data", "error"), [
    (b"", "magic"),
    (b"something-else\x001\x00a\x000\x00/", "magic"),
    (handoff.MAGIC + b"\x00x\x00a\x000\x00/", "bad argv count"),
    (handoff.MAGIC + b"\x002\x00a\x000\x00/", "bad environment count"),  # argv eats "0"
    (handoff.MAGIC + b"\x001\x00a\x002\x00A=1\x00/", "field count mismatch"),
    (handoff.MAGIC + b"\x001\x00a\x001\x00A=1\x00/\x00extra", "field count mismatch"),
    (handoff.MAGIC + b"\x000\x000\x00/", "empty argv"),
    (handoff.MAGIC + b"\x001\x00a\x001\x00NOEQUALS\x00/", "without a name"),
    (handoff.MAGIC + b"\x001\x00a\x001\x00=x\x00/", "without a name"),
    (handoff.MAGIC + b"\x001\x00a\x000\x00relative", "not absolute"),
    (handoff.MAGIC + b"\x001", "truncated"),
    (handoff.MAGIC + b"\x00" + b"9" * 7 + b"\x00a", "bad argv count"),
])
def test_malformed_messages_are_refused_with_the_reason(data: bytes, error: str) -> None:
    with pytest.raises(handoff.HandoffError, match=error):
        handoff.decode(data)


def test_oversized_message_is_refused() -> None:
    big = handoff.encode(["a"], {b"BIG": b"x" * handoff.MAX_MESSAGE}, b"/")
    with pytest.raises(handoff.HandoffError, match="larger than"):
        handoff.decode(big)


def test_a_nul_byte_cannot_be_encoded() -> None:
    with pytest.raises(handoff.HandoffError, match="NUL"):
        handoff.encode(["a\0b"], {}, b"/")


@pytest.mark.parametrize(("data", "status"), [(b"0", 0), (b"1", 1), (b"137", 137),
                                              (b"", None), (b"x", None), (b"1234", None)])
def test_status(data: bytes, status: int | None) -> None:
    assert handoff.decode_status(data) == status
    if status is not None:
        assert handoff.decode_status(handoff.encode_status(status)) == status
