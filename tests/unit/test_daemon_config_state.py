"""kata-ipud's configuration loader and durable state store."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from kata_ipu import errors
from kata_ipu.block.model import Device, ExportKind
from kata_ipu.daemon import config
from kata_ipu.daemon.state import (
    BaseRecord,
    BaseState,
    ImageRecord,
    StateStore,
    VolumeRecord,
    VolumeState,
)
from kata_ipu.ttrpc import TcpAddress, UnixAddress


def test_defaults_without_a_file(tmp_path: Path) -> None:
    cfg = config.load(tmp_path / "missing.toml")
    assert cfg.root == Path("/var/lib/kata-ipu")
    assert cfg.addresses == (UnixAddress("/run/kata-ipu/ipud.sock"),)
    assert cfg.socket_mode == 0o660 and cfg.block.backend == "file"


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "ipud.toml"
    path.write_text('root = "/srv/ipu"\nsocket_mode = "0600"\n'
                    'addresses = ["unix:///tmp/a.sock", "tcp://127.0.0.1:7070"]\n'
                    '[tcp]\ntoken_file = "/etc/kata-ipu/token"\n'
                    '[rootfs]\nmin_size = "16M"\nmax_size = "2G"\nheadroom = 1\n'
                    '[block]\nbackend = "qsd"\npool_size = "8GiB"\n')
    cfg = config.load(path)
    assert cfg.root == Path("/srv/ipu") and cfg.socket_mode == 0o600
    assert cfg.addresses[1] == TcpAddress("127.0.0.1", 7070)
    assert (cfg.rootfs.min_size, cfg.rootfs.max_size, cfg.rootfs.headroom) == (
        16 << 20, 2 << 30, 1.0)
    assert (cfg.block.backend, cfg.block.pool_size) == ("qsd", 8 << 30)
    over = config.load(path, root=str(tmp_path), addresses=["unix:///tmp/b.sock"])
    assert over.root == tmp_path and over.addresses == (UnixAddress("/tmp/b.sock"),)
    assert over.state_db == tmp_path / "state.db"


@pytest.mark.parametrize(("text", "fragment"), [
    ("rot = '/x'", "unknown key(s): rot"),
    ("[block]\nbakend = 'file'", "unknown key(s) in [block]: bakend"),
    ("[block]\nbackend = 'lvm'", "'lvm' is not file or qsd"),
    ("[rootfs]\nmin_size = 'lots'", "[rootfs] min_size: 'lots' is not a size"),
    ("[tcp]\ninsecure = 'yes'", "[tcp] insecure must be true or false"),
    ("addresses = ['tcp://0.0.0.0:7070']", "without authentication"),
    ("addresses = ['ftp://x']", "unknown scheme"),
    ("[metrics]\naddress = '0.0.0.0:9464'", "must be on loopback"),
    ("socket_mode = 'rw'", "not octal"),
    ("= broken", "not valid TOML"),
])
def test_bad_config_names_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(errors.InvalidArgument) as info:
        config.load(path)
    assert fragment in str(info.value)
    assert str(info.value).startswith(str(path))


def test_insecure_tcp_must_be_explicit(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text("addresses = ['tcp://127.0.0.1:7070']\n[tcp]\ninsecure = true\n")
    assert config.load(path).tcp.insecure


async def test_state_roundtrip_and_persistence(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = await StateStore.open(db)
    img = ImageRecord("sha256:aa", "sha256:cc", "linux/amd64", 1234, time.time())
    await store.put_image(img, "docker.io/library/busybox:latest")
    await store.put_image(img, "127.0.0.1:5000/busybox:1")
    await store.put_base(BaseRecord("b1", "sha256:aa", "ext4", BaseState.BUILDING))
    await store.put_base(BaseRecord("b1", "sha256:aa", "ext4", BaseState.READY, 1 << 20,
                                    time.time(), 0.5))
    vol = VolumeRecord("c1", "v-c1", "b1", "busybox", "sha256:aa", VolumeState.READY,
                       ExportKind.HOST_BLOCK,
                       Device("v-c1", ExportKind.HOST_BLOCK, "/dev/loop3", 1 << 20, "v-c1",
                              major=7, minor=3),
                       {"io.kubernetes.cri.sandbox-id": "s"}, time.time())
    await store.put_volume(vol)
    await store.add_lease("image:sha256:aa", "sha256:layer1")
    await store.close()

    store = await StateStore.open(db)  # reopened: everything survived
    got = await store.get_image("docker.io/library/busybox:latest")
    assert got is not None and got.digest == "sha256:aa"
    assert got.names == ("127.0.0.1:5000/busybox:1", "docker.io/library/busybox:latest")
    assert (await store.get_image("sha256:aa")) == got
    base = await store.get_base("b1")
    assert base is not None and base.state is BaseState.READY and base.size_bytes == 1 << 20
    assert await store.get_volume("c1") == vol
    assert [v.container_id for v in await store.list_volumes("b1")] == ["c1"]
    assert await store.leased_targets() == {"sha256:layer1"}
    await store.delete_volume("c1")
    await store.remove_lease("image:sha256:aa")
    await store.delete_image("sha256:aa")
    assert await store.get_image("docker.io/library/busybox:latest") is None
    assert await store.get_volume("c1") is None and await store.leased_targets() == set()
    await store.close()
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_prepare_view_reads_volume_image_and_its_base_together(tmp_path: Path) -> None:
    store = await StateStore.open(tmp_path / "state.db")
    img = ImageRecord("sha256:aa", "sha256:cc", "linux/amd64", 1, time.time())
    await store.put_image(img, "reg/busybox:1")
    base = BaseRecord("ext4-aa", "sha256:aa", "ext4", BaseState.READY, 1, time.time(), 0.1)
    await store.put_base(base)
    await store.put_base(BaseRecord("xfs-aa", "sha256:aa", "xfs", BaseState.READY))
    vol = VolumeRecord("c1", "c1", "ext4-aa", "reg/busybox:1", "sha256:aa",
                       VolumeState.READY, ExportKind.HOST_BLOCK, created_at=1.0)
    await store.put_volume(vol)

    def ext4(digest: str) -> str:
        return "ext4-" + digest.removeprefix("sha256:")

    view = await store.prepare_view("c1", "reg/busybox:1", ext4)
    assert (view.volume, view.image, view.base) == (vol, await store.get_image("sha256:aa"),
                                                    base)
    view = await store.prepare_view("c2", "sha256:aa", ext4)  # by digest, no volume yet
    assert view.volume is None and view.base == base
    assert view.image is not None and view.image.digest == "sha256:aa"
    view = await store.prepare_view("c2", "reg/other:1", ext4)  # unknown image: no base
    assert (view.volume, view.image, view.base) == (None, None, None)
    await store.close()


async def test_state_serializes_concurrent_writers(tmp_path: Path) -> None:
    store = await StateStore.open(tmp_path / "state.db")
    await asyncio.gather(*(
        store.put_volume(VolumeRecord(f"c{i}", f"v{i}", "b", "img", "d", VolumeState.READY,
                                      ExportKind.HOST_BLOCK, created_at=float(i)))
        for i in range(200)))
    assert len(await store.list_volumes()) == 200
    await store.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    sqlite3.connect(db).execute("PRAGMA user_version=99")
    with pytest.raises(errors.Internal, match="newer than this daemon"):
        await StateStore.open(db)


async def test_a_version_1_state_is_migrated_and_keeps_its_bases(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)
    old.executescript("""
        CREATE TABLE bases (id TEXT PRIMARY KEY, digest TEXT NOT NULL, fstype TEXT NOT NULL,
            state TEXT NOT NULL, size_bytes INTEGER NOT NULL DEFAULT 0,
            built_at REAL NOT NULL DEFAULT 0, build_seconds REAL NOT NULL DEFAULT 0);
        INSERT INTO bases VALUES ('b1', 'sha256:aa', 'ext4', 'ready', 4096, 1.0, 2.0);
        PRAGMA user_version=1;""")
    old.close()
    store = await StateStore.open(db)
    assert await store.get_base("b1") == BaseRecord("b1", "sha256:aa", "ext4", BaseState.READY,
                                                    4096, 1.0, 2.0, 0)
    await store.put_base(BaseRecord("b2", "sha256:aa", "ext4", BaseState.READY, layers=3))
    assert [b.layers for b in await store.list_bases("sha256:aa")] == [0, 3]
    await store.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 2


def test_out_of_space_is_found_in_the_cause_chain() -> None:
    import errno as _errno

    from kata_ipu.daemon.faults import out_of_space as _out_of_space
    from kata_ipu.executor import CommandFailed, Completed

    failed = CommandFailed(Completed(("mkfs.ext4",), 1, b"", b"No space left on device", 0.1))
    assert _out_of_space(failed)
    try:
        try:
            raise OSError(_errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise errors.Internal("copy failed") from exc
    except errors.Internal as wrapped:
        assert _out_of_space(wrapped)
    assert not _out_of_space(errors.Internal("other"))
    assert not _out_of_space(OSError(_errno.EIO, "I/O error"))


def test_cancelled_error_maps_to_cancelled() -> None:
    assert errors.code_for(asyncio.CancelledError()) is errors.Code.CANCELLED


def test_shipped_default_config_loads_and_matches_the_defaults() -> None:
    shipped = Path(__file__).parents[2] / "configs" / "ipud.toml"
    assert config.load(shipped) == config.load(shipped.with_name("does-not-exist.toml"))


@pytest.mark.parametrize("value", ["-1", "true", '"2"', "1.5"])
def test_warm_clones_must_be_a_whole_number(tmp_path: Path, value: str) -> None:
    path = tmp_path / "ipud.toml"
    path.write_text(f"[rootfs]\nwarm_clones = {value}\n")
    with pytest.raises(errors.InvalidArgument, match=r"\[rootfs\] warm_clones must be a whole"):
        config.load(path)
    path.write_text("[rootfs]\nwarm_clones = 3\n")
    assert config.load(path).rootfs.warm_clones == 3
