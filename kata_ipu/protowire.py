"""The protobuf wire format by hand: varints, keys, fields, and splitting a message.

One implementation for every hand-coded message in the project: the ttrpc envelopes
(:mod:`kata_ipu.ttrpc.wire`), the few containerd Task API messages the shim rewrites
(:mod:`shim_hooks.taskapi`) and the Kata agent messages of the VM tests
(:mod:`tests.support.agentproto`). Stdlib only and no asyncio, so the shim's one-shot
``start``/``delete`` actions and the guest's Debian python3 can import it cheaply; generated
code is avoided there because Debian's python3-protobuf cannot load current protoc output.
"""

from __future__ import annotations

from kata_ipu.errors import InvalidArgument

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5

Field = tuple[int, int, int | bytes]


class WireError(InvalidArgument):
    """A protobuf message is malformed (the message names the field and the problem)."""


def read_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def _read_value(buf: bytes | memoryview, pos: int, end: int, number: int, wt: int
                ) -> tuple[int | bytes, int]:
    """The value of a varint, length-delimited or fixed field at ``pos``, and the position
    after it."""
    if wt == VARINT:
        return read_varint(buf, pos, end)
    if wt == LEN:
        length, pos = read_varint(buf, pos, end)
        if length > end - pos:
            raise WireError(f"field {number}: length {length} runs past the message end")
        return bytes(buf[pos:pos + length]), pos + length
    if wt in (I64, I32):
        size = 8 if wt == I64 else 4
        if pos + size > end:
            raise WireError(f"field {number}: truncated fixed{size * 8}")
        return int.from_bytes(buf[pos:pos + size], "little"), pos + size
    raise WireError(f"field {number}: invalid wire type {wt}")


def iter_fields(buf: bytes | memoryview) -> list[Field]:
    """``(field number, wire type, value)``: ints for varint/fixed, bytes for length-delimited;
    groups are skipped."""
    out: list[Field] = []
    pos, end = 0, len(buf)
    depth = 0
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        number, wt = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0 is invalid")
        if wt == SGROUP:
            depth += 1
            continue
        if wt == EGROUP:
            depth -= 1
            if depth < 0:
                raise WireError(f"field {number}: unbalanced end of group")
            continue
        value, pos = _read_value(buf, pos, end, number, wt)
        if depth == 0:
            out.append((number, wt, value))
    if depth:
        raise WireError("truncated group")
    return out


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def len_field(number: int, data: bytes) -> bytes:
    return varint((number << 3) | LEN) + varint(len(data)) + data


def str_field(number: int, value: str) -> bytes:
    return len_field(number, value.encode()) if value else b""


def int_field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value) if value else b""


def encode_field(number: int, wire_type: int, value: int | bytes) -> bytes:
    """Re-encode one field exactly as :func:`iter_fields` returned it."""
    key = varint((number << 3) | wire_type)
    if wire_type == VARINT and isinstance(value, int):
        return key + varint(value)
    if wire_type == LEN and isinstance(value, bytes):
        return key + varint(len(value)) + value
    if wire_type == I64 and isinstance(value, int):
        return key + value.to_bytes(8, "little")
    if wire_type == I32 and isinstance(value, int):
        return key + value.to_bytes(4, "little")
    raise WireError(f"field {number}: cannot re-encode wire type {wire_type}")


# -- typed field values (for decoders of hand-coded messages) ---------------------------------

def as_str(number: int, value: int | bytes) -> str:
    """A ``string`` field's value, checked (length-delimited, UTF-8)."""
    if not isinstance(value, bytes):
        raise WireError(f"field {number}: expected a length-delimited string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"field {number}: invalid UTF-8") from exc


def as_bytes(number: int, value: int | bytes) -> bytes:
    """A ``bytes`` or embedded-message field's value."""
    if not isinstance(value, bytes):
        raise WireError(f"field {number}: expected length-delimited bytes")
    return value


def as_uint(number: int, value: int | bytes) -> int:
    """A ``uint32``/``uint64``/``bool``/enum varint field's value."""
    if not isinstance(value, int):
        raise WireError(f"field {number}: expected a varint")
    return value


def as_int(number: int, value: int | bytes, bits: int = 64) -> int:
    """An ``int32``/``int64`` varint field's value (two's complement)."""
    value = as_uint(number, value) & ((1 << 64) - 1)
    if bits == 32:
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value >= 1 << 31 else value
    return value - (1 << 64) if value >= 1 << 63 else value
