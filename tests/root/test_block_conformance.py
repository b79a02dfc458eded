"""One conformance suite (containerd ``SnapshotterSuite`` style) run against every block
backend, on real loop devices, real mounts and a real qemu-storage-daemon.

Every test ends with the pool torn down and the kernel asked (sysfs, ``losetup -J``,
/proc/mounts, /proc/*/cmdline, the directory tree) whether anything was left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kata_ipu.block import (
    BACKENDS,
    BadId,
    BadImage,
    BaseExists,
    BaseInUse,
    BaseNotFound,
    ExportKind,
    NeedsIpu,
    PoolFull,
    State,
    VolumeBusy,
    VolumeExists,
    VolumeNotFound,
    create_pool,
    open_pool,
    serial_for,
)
from kata_ipu.block.engine import StoreTarget
from kata_ipu.block.errors import IllegalTransition
from kata_ipu.block.model import check_transition
from kata_ipu.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from kata_ipu.testing.prereq import require_programs, require_root
from tests.root.block_helpers import (
    assert_no_leaks,
    files_under,
    loops_under,
    make_ext4,
    mounts_under,
    qsd_processes,
    sha256,
)

BASE_TEXT = "hello from the base image\n"
POOL_SIZE = 1 << 30


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    require_programs("mkfs.ext4", "mkfs.xfs", "qemu-storage-daemon", "qemu-img", "mount")
    d = tmp_path_factory.mktemp("img")
    tree = d / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text(BASE_TEXT)
    (tree / "data.bin").write_bytes(random.Random(1).randbytes(1 << 20))
    return make_ext4(d / "base.ext4", tree, 64)


class Env:
    """A pool under test with its directories; ``mnt`` is a scratch mount point."""

    def __init__(self, backend: str, tmp: Path, run_dir: Path) -> None:
        self.backend = backend
        self.root = tmp / "pool"
        self.run_dir = run_dir
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.target: StoreTarget = create_pool(self.root, backend=backend, size=POOL_SIZE,
                                               run_dir=run_dir)

    def reopen(self) -> StoreTarget:
        self.target.close()
        self.target = open_pool(self.root, run_dir=self.run_dir)
        return self.target

    def mount(self, dev: str) -> None:
        subprocess.run(["mount", "-t", "ext4", dev, str(self.mnt)], check=True)

    def umount(self) -> None:
        subprocess.run(["umount", str(self.mnt)], check=True)


@pytest.fixture(params=sorted(BACKENDS))
def env(request: pytest.FixtureRequest, tmp_path: Path, base_image: Path) -> Iterator[Env]:
    run_dir = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp")) / "run"  # short: socket paths
    e = Env(request.param, tmp_path, run_dir)
    try:
        yield e
    finally:
        for m in mounts_under(e.mnt):
            subprocess.run(["umount", "-l", m], check=False)
        e.target.destroy_pool(force=True)
        e.target.close()
        assert_no_leaks(e.root, run_dir)
        run_dir.parent.rmdir()


def _write_at(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_at(dev: str, offset: int, size: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


# -- the suite ---------------------------------------------------------------------------------

def test_clone_isolation(env: Env, base_image: Path) -> None:
    t = env.target
    base = t.import_base(base_image, "base")
    a, b = t.clone(base, "vol-a"), t.clone(base, "vol-b")
    for vol, name in ((a, "a"), (b, "b")):
        dev = t.export(vol, ExportKind.HOST_BLOCK)
        env.mount(dev.path)
        (env.mnt / f"{name}.txt").write_text(f"written to {name}\n")
        (env.mnt / "hello.txt").write_text(f"overwritten in {name}\n")
        env.umount()
    for vol, mine, other in ((a, "a", "b"), (b, "b", "a")):
        dev = t.export(vol, ExportKind.HOST_BLOCK)
        env.mount(dev.path)
        assert (env.mnt / f"{mine}.txt").read_text() == f"written to {mine}\n"
        assert not (env.mnt / f"{other}.txt").exists()
        assert (env.mnt / "hello.txt").read_text() == f"overwritten in {mine}\n"
        env.umount()
    # the base still has the original content, byte for byte
    assert sha256(base.path) == sha256(base_image)
    fresh = t.clone(base, "vol-c")
    dev = t.export(fresh, ExportKind.HOST_BLOCK)
    env.mount(dev.path)
    assert (env.mnt / "hello.txt").read_text() == BASE_TEXT
    assert not (env.mnt / "a.txt").exists()
    env.umount()
    # raw blocks too: a write to A at an offset is not seen by B
    da = t.export(a, ExportKind.HOST_BLOCK)
    db = t.export(b, ExportKind.HOST_BLOCK)
    before = _read_at(db.path, 40 << 20, 4096)
    _write_at(da.path, 40 << 20, b"A" * 4096)
    assert _read_at(da.path, 40 << 20, 4096) == b"A" * 4096
    assert _read_at(db.path, 40 << 20, 4096) == before != b"A" * 4096


def test_base_immutable_after_100_clones_with_writes(env: Env, base_image: Path) -> None:
    t = env.target
    base = t.import_base(base_image, "base")
    digest = sha256(base.path)
    assert digest == sha256(base_image)
    rng = random.Random(7)
    written = {}
    for i in range(100):
        vol = t.clone(base, f"c{i}")
        dev = t.export(vol, ExportKind.HOST_BLOCK)
        offset = rng.randrange(0, (64 << 20) - 4096, 4096)
        payload = f"clone {i} ".encode().ljust(4096, b"x")
        _write_at(dev.path, offset, payload)
        written[vol.id] = (offset, payload)
        t.unexport(vol)
    assert sha256(base.path) == digest
    assert base.path.stat().st_mode & 0o222 == 0
    with pytest.raises(PermissionError):  # even root: immutable (or, for qsd, 0444 + flag)
        open(base.path, "r+b").close()
    for vid in ("c0", "c57", "c99"):  # each clone kept its own write
        offset, payload = written[vid]
        dev = t.export(vid, ExportKind.HOST_BLOCK)
        assert _read_at(dev.path, offset, 4096) == payload
        t.unexport(vid)
    for i in range(100):
        t.destroy(f"c{i}")
    assert sha256(base.path) == digest


def test_export_mountable_and_data_survives_reexport(env: Env, base_image: Path) -> None:
    t = env.target
    vol = t.clone(t.import_base(base_image, "base"), "ctr-1")
    dev = t.export(vol, ExportKind.HOST_BLOCK)
    assert dev.path.startswith("/dev/loop") and dev.major == 7
    assert os.major(os.stat(dev.path).st_rdev) == dev.major
    assert os.minor(os.stat(dev.path).st_rdev) == dev.minor
    assert dev.size == base_image.stat().st_size
    assert dev.serial == "ctr-1"
    served = Path(f"/sys/block/loop{dev.minor}/loop/backing_file").read_text().strip()
    assert served.startswith((str(env.root), str(env.run_dir)))
    assert t.export(vol, ExportKind.HOST_BLOCK) == dev  # idempotent
    env.mount(dev.path)
    (env.mnt / "persist.txt").write_text("still here\n")
    env.umount()
    t.unexport(vol)
    assert loops_under(env.root, env.run_dir) == [
        x for x in loops_under(env.root, env.run_dir) if "pool.xfs" in x]
    t = env.reopen()  # a new handle sees the same state
    assert t.get_volume("ctr-1").state is State.READY
    dev2 = t.export("ctr-1", ExportKind.HOST_BLOCK)
    env.mount(dev2.path)
    assert (env.mnt / "persist.txt").read_text() == "still here\n"
    assert (env.mnt / "hello.txt").read_text() == BASE_TEXT
    env.umount()
    assert t.get_volume("ctr-1").device == dev2


def test_every_export_kind_then_teardown_leaves_nothing(env: Env, base_image: Path) -> None:
    t = env.target
    base = t.import_base(base_image, "base")
    for kind in sorted(t.export_kinds, key=lambda k: k.value):
        vol = t.clone(base, f"v-{kind.value}")
        dev = t.export(vol, kind)
        assert dev.kind is kind and dev.serial == vol.id
        if kind is ExportKind.VHOST_USER_BLK:
            assert dev.socket and Path(dev.socket).is_socket()
        if kind is ExportKind.NBD:
            info = subprocess.run(["qemu-img", "info", "--output=json", dev.path],
                                  capture_output=True, text=True, check=True).stdout
            assert f'"virtual-size": {base.size}' in info
        if kind is ExportKind.FUSE:
            assert Path(dev.path).stat().st_size == base.size
            with open(dev.path, "rb") as f:
                f.seek(1024)
                assert f.read(1024) == _read_at(str(base.path), 1024, 1024)  # ext4 superblock
    assert t.usage().exported == len(t.export_kinds)
    if env.backend == "qsd":
        assert len(t.qsd_exports()) == len(t.export_kinds)  # type: ignore[attr-defined]
    for vol in t.list().volumes:
        t.destroy(vol)
    assert loops_under(env.run_dir) == []
    if env.backend == "qsd":
        assert t.qsd_exports() == []  # type: ignore[attr-defined]
        assert t.qsd_nodes() == [t._base_node("base")]  # type: ignore[attr-defined]
    else:
        assert qsd_processes(env.root, env.run_dir) == []
    t.destroy_base("base")
    if env.backend == "qsd":
        assert t.qsd_nodes() == []  # type: ignore[attr-defined]
    assert t.list().volumes == () and t.list().bases == ()
    assert files_under(t.volumes_dir) == [] and files_under(t.bases_dir) == []


def test_concurrent_clone_destroy_of_50_ids(env: Env, base_image: Path) -> None:
    t = env.target
    base = t.import_base(base_image, "base")
    ids = [f"ctr-{i}" for i in range(50)]
    ops = [(op, i) for i in ids for op in ("clone", "clone", "export", "destroy", "clone")]
    random.Random(3).shuffle(ops)

    def run(op: str, vid: str) -> str:
        try:
            if op == "clone":
                t.clone(base, vid)
            elif op == "export":
                t.export(vid, ExportKind.HOST_BLOCK)
            else:
                t.destroy(vid, missing_ok=True)
        except VolumeNotFound:
            return "gone"
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda a: run(*a), ops))
    assert set(results) <= {"ok", "gone"}
    listed = {v.id: v for v in t.list().volumes}
    on_disk = {p.name.rsplit(".", 1)[0] for p in t.volumes_dir.iterdir()}
    assert set(listed) == on_disk
    assert all(v.state in (State.READY, State.EXPORTED) for v in listed.values())
    exported_loops = [v.device.minor for v in listed.values() if v.device]
    assert len(loops_under(env.run_dir, t.volumes_dir)) == len(exported_loops)
    assert set(t.store.ids("volumes")) == set(listed)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda v: t.destroy(v, missing_ok=True), ids * 2))
    assert t.list().volumes == ()
    assert loops_under(t.volumes_dir, env.run_dir) == []
    assert files_under(t.volumes_dir) == []


def _worker(env: Env, *args: str) -> subprocess.Popen[str]:
    # one process drives a pool at a time (the daemon's QMP monitor takes one client)
    env.target.close()
    return subprocess.Popen(
        [sys.executable, "-m", "tests.root.block_worker", str(env.root), str(env.run_dir),
         *args], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])


def test_crash_in_the_middle_of_clone_then_list_is_consistent(env: Env,
                                                              base_image: Path) -> None:
    t = env.target
    t.import_base(base_image, "base")
    # 1. killed exactly between the clone's data and its READY record
    proc = _worker(env, "base", "ok-", "3", "crash-me")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert out.split() == ["ready", "ok-0", "ok-1", "ok-2"]
    assert t.store.read("volumes", "crash-me")["state"] == State.CREATING.value
    assert t.volume_path("crash-me").exists()  # the half-made clone is really there
    assert "crash-me" not in {v.id for v in t.list().volumes}  # list never shows it
    t = env.reopen()  # recovery rolls it back
    assert sorted(v.id for v in t.list().volumes) == ["ok-0", "ok-1", "ok-2"]
    assert t.store.read("volumes", "crash-me") is None
    assert not t.volume_path("crash-me").exists()
    assert t.clone("base", "crash-me").state is State.READY  # and the id is usable again
    # 2. killed at an arbitrary moment of a clone loop
    proc = _worker(env, "base", "r-", "400")
    assert proc.stdout is not None
    for _ in range(5):
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    t = env.reopen()
    listed = {v.id for v in t.list().volumes}
    on_disk = {p.name.rsplit(".", 1)[0] for p in t.volumes_dir.iterdir()}
    assert listed == on_disk
    assert set(t.store.ids("volumes")) == listed
    assert os.listdir(t.store.dir / "tmp") == []
    for vid in sorted(listed):
        dev = t.export(vid, ExportKind.HOST_BLOCK)
        env.mount(dev.path)
        assert (env.mnt / "hello.txt").read_text() == BASE_TEXT
        env.umount()
        t.destroy(vid)
        if vid.startswith("r-1"):
            break


def test_crash_in_the_middle_of_export_then_recovery_removes_the_export(
        env: Env, base_image: Path) -> None:
    t = env.target
    t.import_base(base_image, "base")
    proc = _worker(env, "base", "ok-", "1", "half-exported", "export")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert out.split() == ["ready", "ok-0"]
    # the kernel has a loop device for the volume that no record knows about
    assert t.store.read("volumes", "half-exported")["export"] is None
    leaked = loops_under(t.volumes_dir, env.run_dir)
    leaked = [x for x in leaked if "pool.xfs" not in x]
    assert len(leaked) == 1
    t = env.reopen()
    assert [x for x in loops_under(t.volumes_dir, env.run_dir) if "pool.xfs" not in x] == []
    vol = t.get_volume("half-exported")
    assert vol.state is State.READY and vol.device is None
    if env.backend == "qsd":
        assert t.qsd_exports() == []  # type: ignore[attr-defined]
    dev = t.export(vol, ExportKind.HOST_BLOCK)  # and it exports normally again
    env.mount(dev.path)
    assert (env.mnt / "hello.txt").read_text() == BASE_TEXT
    env.umount()


def test_serial_is_derived_from_the_volume_id() -> None:
    assert serial_for("ctr-1") == "ctr-1"
    long_ids = [f"k8s_pod-{i:04d}_container-with-a-very-long-name" for i in range(2000)]
    serials = {serial_for(v) for v in long_ids}
    assert len(serials) == len(long_ids)  # distinct
    assert all(len(s.encode()) <= 20 for s in serials)
    assert serial_for(long_ids[0]) == serial_for(long_ids[0])  # stable
    assert serial_for(long_ids[0]).startswith("k8s_pod")
    with pytest.raises(BadId):
        serial_for("a/b")


def test_state_machine_rejects_illegal_transitions() -> None:
    check_transition("volume", "v", None, State.CREATING)
    check_transition("volume", "v", State.EXPORTED, State.READY)
    for old, new in ((None, State.READY), (State.READY, State.CREATING),
                     (State.DESTROYING, State.READY), (State.CREATING, State.EXPORTED)):
        with pytest.raises(IllegalTransition):
            check_transition("volume", "v", old, new)


def test_bad_input_and_limits(env: Env, base_image: Path, tmp_path: Path) -> None:
    t = env.target
    base = t.import_base(base_image, "base")
    vol = t.clone(base, "v1")
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200, "sp ace", None):
        with pytest.raises(BadId) as err:
            t.clone(base, bad)  # type: ignore[arg-type]
        assert isinstance(err.value, InvalidArgument)
    with pytest.raises(BadId):
        t.import_base(base_image, "../escape")
    with pytest.raises(VolumeNotFound) as nf:
        t.export("no-such-volume", ExportKind.HOST_BLOCK)
    assert isinstance(nf.value, NotFound) and "no-such-volume" in str(nf.value)
    with pytest.raises(BaseNotFound):
        t.clone("no-such-base", "v2")
    with pytest.raises(VolumeExists):
        t.clone(t.import_base(base_image, "other-base"), "v1")
    assert t.clone(base, "v1") == vol  # idempotent
    assert t.import_base(base_image, "base") == base  # idempotent
    (tmp_path / "different.img").write_bytes(b"\0" * 4096)
    with pytest.raises(BaseExists):
        t.import_base(tmp_path / "different.img", "base")
    for name, data in (("empty.img", b""), ("odd.img", b"x" * 1000)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImage):
            t.import_base(tmp_path / name, "b2")
    with pytest.raises(BadImage):
        t.import_base(tmp_path / "missing.img", "b2")
    with pytest.raises(BadImage):
        t.import_base(tmp_path, "b2")
    with pytest.raises(NeedsIpu) as ipu:
        t.export(vol, ExportKind.VFIO_PCI)
    assert isinstance(ipu.value, FailedPrecondition) and "IPU" in str(ipu.value)
    with pytest.raises(BaseInUse) as inuse:
        t.destroy_base("base")
    assert isinstance(inuse.value, FailedPrecondition) and "v1" in str(inuse.value)
    dev = t.export(vol, ExportKind.HOST_BLOCK)
    with pytest.raises(VolumeBusy):
        t.export(vol, ExportKind.VHOST_USER_BLK)
    env.mount(dev.path)
    with pytest.raises(VolumeBusy):
        t.unexport(vol)
    with pytest.raises(VolumeBusy):
        t.destroy(vol)
    env.umount()
    t.destroy(vol)
    with pytest.raises(VolumeNotFound):
        t.destroy(vol)  # double destroy
    t.destroy(vol, missing_ok=True)
    with pytest.raises(FailedPrecondition):
        t.destroy_pool()  # bases still there
    assert [b.id for b in t.list().bases] == ["base", "other-base"]
    assert loops_under(t.volumes_dir, env.run_dir) == []


def test_pool_full_leaves_no_partial_file(env: Env, tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        block = random.Random(5).randbytes(1 << 20)
        for _ in range(600):
            f.write(block)
    t = env.target
    t.import_base(big, "big-1")
    before_files = files_under(t.bases_dir)
    before_used = t.usage().used
    with pytest.raises(PoolFull) as full:
        t.import_base(big, "big-2")
    assert isinstance(full.value, ResourceExhausted)
    assert files_under(t.bases_dir) == before_files
    assert t.store.read("bases", "big-2") is None
    assert t.usage().used <= before_used + (1 << 20)
    assert [b.id for b in t.list().bases] == ["big-1"]
