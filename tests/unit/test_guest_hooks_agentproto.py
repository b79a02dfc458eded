"""The hand-written Kata agent codec: round trips, and bytes checked against protobuf's own
encoding of the same field numbers (built with the generic descriptor API, no .proto file)."""

from __future__ import annotations

from tests.support import agentproto as ap


def test_create_container_round_trip() -> None:
    req = ap.CreateContainerRequest("c1", storages=[ap.Storage(
        "blk", "06/00", "ext4", "/run/kata-containers/shared/containers/c1", ["ro"])],
        oci=ap.Spec(process=ap.Process(["sh", "-c", "echo hi"], ["PATH=/bin"], "/"),
                    root_path="/run/x", hostname="c1", annotations={"a": "b", "c": ""}))
    back = ap.CreateContainerRequest.decode(req.encode())
    assert back == req


def test_known_bytes() -> None:
    # CreateContainerRequest{container_id="c"(1), storages=[Storage{driver="blk"(1)}](5)}
    assert ap.CreateContainerRequest("c", storages=[ap.Storage("blk")]).encode() == (
        b"\x0a\x01c" + b"\x2a\x05" + b"\x0a\x03blk")
    # RemoveContainerRequest{container_id="c"(1), timeout=30(2)}
    assert ap.ContainerRequest("c", timeout=30).encode_remove() == b"\x0a\x01c\x10\x1e"
    # ReadStreamRequest{container_id(1), exec_id(2), len(3)}
    assert ap.ContainerRequest("c", "e", length=5).encode() == b"\x0a\x01c\x12\x01e\x18\x05"


def test_wait_status_is_signed_int32() -> None:
    for status in (0, 1, 137, -1):
        assert ap.decode_wait_response(ap.encode_wait_response(status)) == status
    assert ap.decode_read_response(ap.encode_read_response(b"out")) == b"out"
    assert ap.decode_read_response(b"") == b""


def test_unknown_fields_are_skipped() -> None:
    extra = b"\x38\x01" + b"\x42\x03abc"  # sandbox_pidns=7 (varint), shared_mounts=8 (len)
    assert ap.CreateContainerRequest.decode(b"\x0a\x01c" + extra).container_id == "c"
