"""The ttrpc envelopes, encoded and decoded without generated code.

ttrpc wraps every call in three tiny protobuf messages (containerd/ttrpc ``request.proto``)::

    message Request  { string service = 1; string method = 2; bytes payload = 3;
                       int64 timeout_nano = 4; repeated KeyValue metadata = 5; }
    message Response { google.rpc.Status status = 1; bytes payload = 2; }
    message KeyValue { string key = 1; string value = 2; }
    // google.rpc.Status { int32 code = 1; string message = 2; repeated Any details = 3; }

They are hand-coded here for two reasons: the transport then has no dependency on a protobuf
runtime version (the guest agent runs it on Debian's python3), and it is the hot path of every
call. Encoding follows proto3 rules (default values are omitted, exactly as the Go peer does:
a successful Response has no field 1 at all); decoding skips unknown fields of every wire type,
so a newer peer's additions are tolerated. Malformed input raises :class:`WireError` and nothing
else. tests/unit/test_ttrpc_wire.py checks both directions against google.protobuf.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from kata_ipu import protowire
from kata_ipu.ttrpc.errors import WireError


@dataclass(frozen=True, slots=True)
class Status:
    """google.rpc.Status: ``code`` is a gRPC code; ``details`` keeps raw Any blobs."""

    code: int = 0
    message: str = ""
    details: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Response:
    status: Status | None = None
    payload: bytes = b""


# --------------------------------------------------------------------------- primitives

_varint = protowire.varint
_len_field = protowire.len_field
_VARINT = protowire.VARINT


def _key(number: int, wire_type: int) -> bytes:
    return protowire.varint((number << 3) | wire_type)


def iter_fields(buf: bytes | memoryview) -> list[tuple[int, int, int | bytes]]:
    """:func:`kata_ipu.protowire.iter_fields`, raising this transport's :class:`WireError`."""
    with _as_transport_error():
        return protowire.iter_fields(buf)


@contextlib.contextmanager
def _as_transport_error() -> Iterator[None]:
    """Decoders raise the ttrpc :class:`WireError` (a protowire.WireError) and nothing else."""
    try:
        yield
    except WireError:
        raise
    except protowire.WireError as exc:
        raise WireError(str(exc)) from exc


_string = protowire.as_str
_bytes = protowire.as_bytes
_int = protowire.as_int


# --------------------------------------------------------------------------- messages

def encode_status(status: Status) -> bytes:
    out = b""
    if status.code:
        out += _key(1, _VARINT) + _varint(status.code)
    if status.message:
        out += _len_field(2, status.message.encode())
    for detail in status.details:
        out += _len_field(3, detail)
    return out


def decode_status(data: bytes) -> Status:
    with _as_transport_error():
        return _decode_status(data)


def _decode_status(data: bytes) -> Status:
    code, message, details = 0, "", []
    for number, _wt, value in iter_fields(data):
        if number == 1:
            code = _int(1, value, 32)
        elif number == 2:
            message = _string(2, value)
        elif number == 3:
            details.append(_bytes(3, value))
    return Status(code, message, tuple(details))


_PREFIXES: dict[tuple[str, str], bytes] = {}


def _prefix(service: str, method: str) -> bytes:
    """Fields 1 and 2 of a Request; cached because a client calls few distinct methods."""
    key = (service, method)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        prefix = (_len_field(1, service.encode()) if service else b"") + (
            _len_field(2, method.encode()) if method else b"")
        if len(_PREFIXES) < 1024:
            _PREFIXES[key] = prefix
    return prefix


def encode_request(req: Request) -> bytes:
    parts = [
        _prefix(req.service, req.method),
        _len_field(3, req.payload) if req.payload else b"",
        _key(4, _VARINT) + _varint(req.timeout_nano) if req.timeout_nano else b"",
    ]
    for k, v in req.metadata:
        kv = (_len_field(1, k.encode()) if k else b"") + (_len_field(2, v.encode()) if v else b"")
        parts.append(_len_field(5, kv))
    return b"".join(parts)


def decode_request(data: bytes | memoryview) -> Request:
    with _as_transport_error():
        return _decode_request(data)


def _decode_request(data: bytes | memoryview) -> Request:
    service = method = ""
    payload = b""
    timeout = 0
    md: list[tuple[str, str]] = []
    for number, _wt, value in iter_fields(data):
        if number == 1:
            service = _string(1, value)
        elif number == 2:
            method = _string(2, value)
        elif number == 3:
            payload = _bytes(3, value)
        elif number == 4:
            timeout = _int(4, value, 64)
        elif number == 5:
            key = val = ""
            for n2, _w2, v2 in iter_fields(_bytes(5, value)):
                if n2 == 1:
                    key = _string(1, v2)
                elif n2 == 2:
                    val = _string(2, v2)
            md.append((key, val))
    return Request(service, method, payload, timeout, tuple(md))


def encode_response(resp: Response) -> bytes:
    out = b""
    if resp.status is not None:
        # An explicitly set status is always emitted, even with code 0 (like Go's st.Proto()).
        out += _len_field(1, encode_status(resp.status))
    if resp.payload:
        out += _len_field(2, resp.payload)
    return out


def decode_response(data: bytes | memoryview) -> Response:
    # Fast path for the common success reply: exactly one payload field (``12 <len> ...``)
    # with a one- or two-byte length.
    n = len(data)
    if n >= 2 and data[0] == 0x12:
        if data[1] < 0x80:
            if 2 + data[1] == n:
                return Response(None, bytes(data[2:]))
        elif n >= 3 and data[2] < 0x80 and 3 + ((data[1] & 0x7F) | (data[2] << 7)) == n:
            return Response(None, bytes(data[3:]))
    elif n == 0:
        return Response(None, b"")
    status: Status | None = None
    payload = b""
    with _as_transport_error():
        for number, _wt, value in protowire.iter_fields(data):
            if number == 1:
                status = _decode_status(_bytes(1, value))
            elif number == 2:
                payload = _bytes(2, value)
    return Response(status, payload)
