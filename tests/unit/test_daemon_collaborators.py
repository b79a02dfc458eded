"""The seams issue 15 made in the daemon: flights, ids, the wire table, recovery's steps."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import cast

import pytest

from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.block.interface import BlockTarget
from kata_ipu.block.model import Base, Device, ExportKind, Listing, Volume
from kata_ipu.daemon import wire
from kata_ipu.daemon.flights import BuildKey, Flights, KeyedLocks, PullKey, PullStatus, StatusBoard
from kata_ipu.daemon.ids import base_id_for, check_container_id, layers_of
from kata_ipu.daemon.metrics import Metrics
from kata_ipu.daemon.recovery import Recovery
from kata_ipu.daemon.state import (
    BaseRecord,
    BaseState,
    StateStore,
    VolumeRecord,
    VolumeState,
)
from kata_ipu.errors import InvalidArgument


# -- flights ---------------------------------------------------------------------------------
async def test_one_flight_per_key_shared_by_every_caller() -> None:
    flights = Flights()
    runs = 0
    gate = asyncio.Event()

    async def work() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return "done"

    key = PullKey("reg/busybox:1", "linux/amd64")
    callers = [asyncio.ensure_future(flights.once(key, work)) for _ in range(5)]
    await asyncio.sleep(0)
    assert key in flights and BuildKey("reg/busybox:1") not in flights
    assert PullKey("reg/busybox:1", "linux/arm64") not in flights  # the platform is the key
    gate.set()
    assert await asyncio.gather(*callers) == ["done"] * 5
    assert runs == 1 and key not in flights  # forgotten once done


async def test_a_cancelled_caller_does_not_cancel_the_flight() -> None:
    flights = Flights()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    key = BuildKey("b1")
    first = asyncio.ensure_future(flights.once(key, work))
    second = asyncio.ensure_future(flights.once(key, work))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == 7


async def test_keyed_locks_serialize_one_key_and_forget_it() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def use(key: str, tag: str, hold: float) -> None:
        async with locks.hold(key):
            order.append(f"{tag}+")
            await asyncio.sleep(hold)
            order.append(f"{tag}-")

    await asyncio.gather(use("c1", "a", 0.02), use("c1", "b", 0), use("c2", "x", 0))
    assert order.index("a-") < order.index("b+")  # same id: one after the other
    assert order.index("x+") < order.index("a-")  # another id: meanwhile
    assert len(locks) == 0


def test_status_board_shows_an_entry_while_it_is_in_flight() -> None:
    board = StatusBoard()
    status = PullStatus("reg/busybox:1", "", "downloading", None, time.time())
    with board.showing(PullKey("reg/busybox:1", "linux/amd64"), status):
        assert board.now() == [status] and board.now("reg/") == [status]
        assert board.now("other/") == []
    assert board.now() == []


# -- ids ---------------------------------------------------------------------------------------
def test_base_ids_carry_their_layers() -> None:
    digest = "sha256:" + "ab" * 32
    assert base_id_for(digest, "ext4") == "ab" * 16 + "-ext4"
    assert layers_of(base_id_for(digest, "ext4")) == 0
    assert layers_of(base_id_for(digest, "erofs", 3)) == 3


def test_container_ids_may_not_take_the_spare_prefix() -> None:
    assert check_container_id("ctr-1") == "ctr-1"
    for bad in ("", "-x", "spare.1", "a" * 129):
        with pytest.raises(InvalidArgument):
            check_container_id(bad)


# -- the one export-kind table ------------------------------------------------------------------
def test_one_export_table_both_ways() -> None:
    assert wire.export_kind(pb.EXPORT_UNSPECIFIED) is ExportKind.HOST_BLOCK
    for value, kind in wire.EXPORT_KINDS:
        assert wire.export_kind(value) is kind and wire.export_value(kind) == value
    assert wire.export_value(ExportKind.FUSE) == pb.EXPORT_UNSPECIFIED  # no API value
    with pytest.raises(KeyError):
        wire.export_kind(cast(pb.ExportKind, 42))


def _row(device: Device | None, kind: ExportKind = ExportKind.HOST_BLOCK,
         state: VolumeState = VolumeState.READY, cid: str = "c1") -> VolumeRecord:
    return VolumeRecord(cid, cid, "b1", "reg/busybox:1", "sha256:aa", state, kind, device,
                        {}, 1.0)


def test_device_message_of_a_typed_device() -> None:
    vhost = Device("c1", ExportKind.VHOST_USER_BLK, "/run/v.sock", 4096, "c1",
                   socket="/run/v.sock")
    msg = wire.rootfs_message(_row(vhost, ExportKind.VHOST_USER_BLK), "ext4").device
    assert (msg.kind, msg.vhost_socket, msg.size_bytes, msg.serial, msg.fstype) == (
        pb.VHOST_USER_BLK, "/run/v.sock", 4096, "c1", pb.EXT4)
    loop = Device("c1", ExportKind.HOST_BLOCK, "/dev/loop3", 4096, "c1", major=7, minor=3)
    msg = wire.rootfs_message(_row(loop), "erofs").device
    assert (msg.kind, msg.path, msg.major, msg.minor, msg.vhost_socket, msg.nbd_uri) == (
        pb.HOST_BLOCK, "/dev/loop3", 7, 3, "", "")
    # a row without a device yet: the same bytes as before (an empty device, its fstype)
    assert wire.rootfs_message(_row(None, state=VolumeState.CREATING), "ext4").device == \
        pb.Device(fstype=pb.EXT4)


async def test_volume_rows_keep_their_columns_on_disk(tmp_path: Path) -> None:
    store = await StateStore.open(tmp_path / "state.db")
    dev = Device("c1", ExportKind.HOST_BLOCK, "/dev/loop3", 4096, "c1", major=7, minor=3)
    await store.put_volume(_row(dev))
    await store.put_volume(_row(None, state=VolumeState.CREATING, cid="c2"))
    assert await store.get_volume("c1") == _row(dev)
    await store.close()
    rows = dict(sqlite3.connect(tmp_path / "state.db").execute(
        "SELECT container_id, export_kind || ' ' || device FROM volumes"))
    assert rows["c2"] == "HOST_BLOCK {}"
    assert rows["c1"].startswith('HOST_BLOCK {"kind": "host-block", "major": 7')


# -- recovery against a recording fake target ------------------------------------------------------
class FakeTarget:
    def __init__(self, bases: list[str], volumes: list[Volume]) -> None:
        self.bases = bases
        self.volumes = volumes
        self.calls: list[tuple[str, ...]] = []

    def list(self) -> Listing:
        return Listing(tuple(Base(b, Path(b), 1, "d") for b in self.bases),
                       tuple(self.volumes))

    def retire(self, volume: str) -> None:
        self.calls.append(("retire", volume))

    def destroy_base(self, base_id: str) -> None:
        self.calls.append(("destroy_base", base_id))

    def export(self, volume: str, kind: ExportKind) -> Device:
        self.calls.append(("export", volume, kind.value))
        return Device(volume, kind, "/dev/loop9", 1, volume, major=7, minor=9)


def _vol(vid: str, device: Device | None = None) -> Volume:
    return Volume(vid, "b1", Path(vid), 1, vid, device=device)


async def test_recovery_rolls_back_re_exports_and_removes_orphans(tmp_path: Path) -> None:
    state = await StateStore.open(tmp_path / "state.db")
    await state.put_base(BaseRecord("b1", "sha256:aa", "ext4", BaseState.READY))
    await state.put_base(BaseRecord("b-half", "sha256:aa", "ext4", BaseState.BUILDING))
    await state.put_base(BaseRecord("b-gone", "sha256:aa", "ext4", BaseState.READY))
    await state.put_volume(_row(None, state=VolumeState.CREATING, cid="creating"))
    await state.put_volume(_row(None, cid="lost-export"))
    await state.put_volume(_row(None, cid="missing"))
    target = FakeTarget(["b1", "b-orphan"], [_vol("lost-export"), _vol("spare.1")])
    build = tmp_path / "build"
    build.mkdir()
    (build / "b1.img.partial").write_bytes(b"x")
    metrics = Metrics.create()
    fixes = await Recovery(state, cast(BlockTarget, target), metrics, build).run()

    assert list(build.iterdir()) == []
    assert "removed partial build b1.img.partial" in fixes
    assert ("destroy_base", "b-half") in target.calls
    assert ("retire", "creating") in target.calls and ("retire", "spare.1") in target.calls
    assert ("export", "lost-export", "host-block") in target.calls
    assert ("destroy_base", "b-orphan") in target.calls
    assert ("destroy_base", "b1") not in target.calls
    assert {b.id for b in await state.list_bases()} == {"b1"}
    vols = {v.container_id: v for v in await state.list_volumes()}
    assert set(vols) == {"lost-export"}
    dev = vols["lost-export"].device
    assert dev is not None and dev.path == "/dev/loop9"
    assert any(f.startswith("re-exported volume lost-export") for f in fixes)
    assert any(f.startswith("forgot volume missing") for f in fixes)
    assert any(f.startswith("forgot base b-gone") for f in fixes)
    await state.close()
