"""The hand-written ttrpc envelope codec against google.protobuf as the oracle."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from kata_ipu.ttrpc import WireError
from kata_ipu.ttrpc.wire import (
    Request,
    Response,
    Status,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

# The oracle: containerd/ttrpc's request.proto built as a descriptor at test time.
_PROTO = """
message Request  { string service = 1; string method = 2; bytes payload = 3;
                   int64 timeout_nano = 4; repeated KeyValue metadata = 5; }
message Response { Status status = 1; bytes payload = 2; }
message KeyValue { string key = 1; string value = 2; }
message Status   { int32 code = 1; string message = 2; repeated bytes details = 3; }
"""


def _oracle() -> dict[str, type]:
    fdp = descriptor_pb2.FileDescriptorProto(name="ttrpc_oracle.proto", package="ttrpc",
                                             syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    string, bytes_, int64, int32, msg = (F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_INT64,
                                          F.TYPE_INT32, F.TYPE_MESSAGE)
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    layout = {
        "Request": [("service", 1, string, opt, None), ("method", 2, string, opt, None),
                    ("payload", 3, bytes_, opt, None), ("timeout_nano", 4, int64, opt, None),
                    ("metadata", 5, msg, rep, ".ttrpc.KeyValue")],
        "Response": [("status", 1, msg, opt, ".ttrpc.Status"), ("payload", 2, bytes_, opt, None)],
        "KeyValue": [("key", 1, string, opt, None), ("value", 2, string, opt, None)],
        "Status": [("code", 1, int32, opt, None), ("message", 2, string, opt, None),
                   ("details", 3, bytes_, rep, None)],
    }
    for name, fields in layout.items():
        m = fdp.message_type.add(name=name)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = tname
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"ttrpc.{n}"))
            for n in layout}


ORACLE = _oracle()
assert ORACLE["Request"].__name__ == "Request" and _PROTO

text = st.text(max_size=40)
requests = st.builds(
    Request,
    service=text,
    method=text,
    payload=st.binary(max_size=200),
    timeout_nano=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    metadata=st.lists(st.tuples(text, text), max_size=5).map(tuple),
)
statuses = st.builds(Status, code=st.integers(min_value=-(2**31), max_value=2**31 - 1),
                     message=text, details=st.lists(st.binary(max_size=20), max_size=3)
                     .map(tuple))
responses = st.builds(Response, status=st.none() | statuses, payload=st.binary(max_size=200))


def _oracle_request(req: Request) -> object:
    msg = ORACLE["Request"](service=req.service, method=req.method, payload=req.payload,
                            timeout_nano=req.timeout_nano)
    for k, v in req.metadata:
        msg.metadata.add(key=k, value=v)
    return msg


@settings(max_examples=300, deadline=None)
@given(requests)
def test_request_encoding_matches_protobuf(req: Request) -> None:
    oracle = _oracle_request(req)
    assert encode_request(req) == oracle.SerializeToString(deterministic=True)
    assert decode_request(oracle.SerializeToString()) == req


@settings(max_examples=300, deadline=None)
@given(responses)
def test_response_roundtrip_through_protobuf(resp: Response) -> None:
    parsed = ORACLE["Response"].FromString(encode_response(resp))
    if resp.status is None:
        assert not parsed.HasField("status")
    else:
        assert parsed.HasField("status")
        assert (parsed.status.code, parsed.status.message, tuple(parsed.status.details)) == (
            resp.status.code, resp.status.message, resp.status.details)
    assert parsed.payload == resp.payload
    assert decode_response(parsed.SerializeToString()) == resp


def test_success_response_has_no_status_field() -> None:
    # Byte-for-byte what the Go server sends for a 3-byte payload (no field 1 at all).
    assert encode_response(Response(None, b"\x08\xc9\x55")) == b"\x12\x03\x08\xc9\x55"


def test_known_go_request_frame_body_decodes() -> None:
    # Request captured from the Go client (notes/ttrpc_shim.md 1.2): Echo, 5 s, metadata k=v.
    body = bytes.fromhex("0a11") + b"test.echo.v1.Echo" + bytes.fromhex("1204") + b"Echo" + \
        bytes.fromhex("1a040a02") + b"py" + bytes.fromhex("2080e497d012") + \
        bytes.fromhex("2a060a01") + b"k" + bytes.fromhex("1201") + b"v"
    req = decode_request(body)
    assert req == Request("test.echo.v1.Echo", "Echo", b"\x0a\x02py", 5_000_000_000,
                          (("k", "v"),))


def test_unknown_fields_are_skipped() -> None:
    extra = bytes.fromhex("3801") + bytes.fromhex("4d01020304") + bytes.fromhex("4a0100")
    req = decode_request(encode_request(Request("s", "m", b"p")) + extra)
    assert (req.service, req.method, req.payload) == ("s", "m", b"p")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_raises_only_wire_error(data: bytes) -> None:
    for decode in (decode_request, decode_response):
        try:
            decode(data)
        except WireError:
            pass


@pytest.mark.parametrize(
    "data", [b"\x0a\x05ab", b"\x80", b"\x0b", b"\x00\x00", b"\x0a\x02\xff\xfe"]
)
def test_malformed_envelopes(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_request(data)
