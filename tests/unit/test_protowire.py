"""kata_ipu.protowire: the one hand-written protobuf field codec (checked against protobuf)."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2
from hypothesis import example, given
from hypothesis import strategies as st

from kata_ipu import protowire as pbwire
from kata_ipu.ttrpc import wire


@given(st.binary(max_size=64))
@example(b"\x0b\xb5\x00\x00\x00\x00\x00$")  # a group: skipped, so fewer bytes back
def test_any_bytes_split_or_raise_wire_error(data: bytes) -> None:
    try:
        fields = pbwire.iter_fields(data)
    except pbwire.WireError:
        with pytest.raises(wire.WireError):  # the ttrpc layer re-raises its own subclass
            wire.iter_fields(data)
        return
    again = b"".join(pbwire.encode_field(*f) for f in fields)
    assert pbwire.iter_fields(again) == fields
    # the same bytes, unless some were dropped: a varint written longer than it needs (legal,
    # not canonical) or a group (skipped by design), e.g. b"\x0b\xb5\x00\x00\x00\x00\x00$"
    assert again == data or len(again) < len(data)


@given(st.lists(st.tuples(st.integers(1, 2**29 - 1), st.sampled_from([0, 1, 2, 5]),
                          st.integers(0, 2**32 - 1), st.binary(max_size=20)), max_size=8))
def test_encoded_fields_split_back(fields: list[tuple[int, int, int, bytes]]) -> None:
    wanted = [(n, wt, b if wt == 2 else v) for n, wt, v, b in fields]
    data = b"".join(pbwire.encode_field(*f) for f in wanted)
    assert pbwire.iter_fields(data) == wanted


def test_round_trip_of_a_real_protobuf_message() -> None:
    msg = descriptor_pb2.FileDescriptorProto(name="a.proto", package="p", dependency=["x", "y"])
    msg.options.java_package = "j"
    data = msg.SerializeToString()
    fields = pbwire.iter_fields(data)
    assert b"".join(pbwire.encode_field(*f) for f in fields) == data
    assert [f[0] for f in fields] == [1, 2, 3, 3, 8]


def test_encoders() -> None:
    assert pbwire.varint(300) == b"\xac\x02"
    assert pbwire.varint(-1) == b"\xff" * 9 + b"\x01"
    assert pbwire.str_field(2, "") == b"" and pbwire.int_field(1, 0) == b""
    assert pbwire.len_field(3, b"ab") == b"\x1a\x02ab"
    with pytest.raises(pbwire.WireError):
        pbwire.iter_fields(b"\x0a\x05ab")
