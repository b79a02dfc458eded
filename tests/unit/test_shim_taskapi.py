"""Task API codec: CreateTaskRequest.rootfs is swapped and every other byte survives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kata_ipu.ttrpc.wire import iter_fields
from shim_hooks import taskapi
from shim_hooks.taskapi import CreateTaskRequest, DeleteResponse, Mount


def _s(number: int, value: str) -> bytes:
    data = value.encode()
    return bytes([(number << 3) | 2, len(data)]) + data


def _create(rootfs: list[Mount]) -> bytes:
    # id=1, bundle=2, rootfs=3..., terminal=4 (varint), stdout=6, options=10 (Any), plus an
    # unknown field 99 (varint) and an unknown fixed64 field 98 from a "newer" containerd.
    out = _s(1, "c1") + _s(2, "/run/b/c1")
    for m in rootfs:
        enc = m.encode()
        out += bytes([0x1A, len(enc)]) + enc
    any_ = _s(1, "containerd.runc.v1.Options") + _s(2, "\x08\x01")
    out += b"\x20\x01" + _s(6, "/fifo/out") + bytes([0x52, len(any_)]) + any_
    out += b"\x98\x06\x2a" + b"\x91\x06" + (7).to_bytes(8, "little")
    return out


def test_decode_create_and_replace_rootfs_keeps_everything_else() -> None:
    overlay = Mount("overlay", "overlay", "", ("lowerdir=/a", "upperdir=/b", "workdir=/c"))
    raw = _create([overlay])
    req = CreateTaskRequest.decode(raw)
    assert (req.id, req.bundle, req.rootfs) == ("c1", "/run/b/c1", (overlay,))

    dev = Mount("ext4", "/dev/loop7", options=("rw",))
    out = taskapi.replace_rootfs(raw, (dev,))
    assert CreateTaskRequest.decode(out).rootfs == (dev,)
    before = [f for f in iter_fields(raw) if f[0] != 3]
    after = [f for f in iter_fields(out) if f[0] != 3]
    assert before == after  # incl. the unknown varint/fixed64 fields and the options Any
    assert [f for f in iter_fields(out) if f[0] == 3] == [(3, 2, dev.encode())]


def test_empty_rootfs_gets_one_mount() -> None:
    raw = _create([])
    assert CreateTaskRequest.decode(raw).rootfs == ()
    out = taskapi.replace_rootfs(raw, (Mount("ext4", "/dev/loop1"),))
    assert CreateTaskRequest.decode(out).rootfs == (Mount("ext4", "/dev/loop1"),)


def test_mount_wire_bytes() -> None:
    assert Mount("ext4", "/dev/loop3", "", ("ro",)).encode() == (
        b"\x0a\x04ext4" + b"\x12\x0a/dev/loop3" + b"\x22\x02ro")


@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=20),
       st.lists(st.text(max_size=30), max_size=5))
def test_mount_round_trip(typ: str, source: str, target: str, options: list[str]) -> None:
    m = Mount(typ, source, target, tuple(options))
    assert Mount.decode(m.encode()) == m


def test_id_requests_and_delete_response() -> None:
    assert taskapi.decode_id_request(taskapi.id_request("c1", "e1")) == ("c1", "e1")
    assert taskapi.decode_id_request(taskapi.id_request("c1")) == ("c1", "")
    resp = DeleteResponse(pid=42, exit_status=137, exited_seconds=1700000000, exited_nanos=5)
    assert DeleteResponse.decode(resp.encode()) == resp
    # proto3: zero fields are omitted entirely
    assert DeleteResponse().encode() == b""
    assert taskapi.shutdown_request("c1", now=True) == _s(1, "c1") + b"\x10\x01"
    assert taskapi.decode_connect_response(b"\x08\xc9\x55\x10\x05\x1a\x02v2") == (
        10953, 5, "v2")


def test_all_seventeen_task_methods_are_known() -> None:
    assert len(set(taskapi.TASK_METHODS)) == 17
