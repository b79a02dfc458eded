"""Backend-specific behaviour the conformance suite cannot express: the ``file`` backend's
XFS pool file and loop configuration, the ``qsd`` backend's restart recovery."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu.block import ExportKind, PoolNotFound, create_pool, open_pool
from kata_ipu.block.filebackend import FileTarget
from kata_ipu.block.qsdbackend import QsdTarget
from kata_ipu.testing.prereq import require_programs, require_root
from tests.root.block_helpers import assert_no_leaks, loops_under, mounts_under, sha256


@pytest.fixture
def image(tmp_path: Path) -> Path:
    require_root()
    require_programs("mkfs.ext4", "mkfs.xfs", "xfs_info", "qemu-storage-daemon", "qemu-img")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello\n")
    path = tmp_path / "base.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(path), "32M"],
                   check=True)
    return path


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
    yield d / "run"
    shutil.rmtree(d, ignore_errors=True)


def _mount(dev: str, mnt: Path) -> None:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", dev, str(mnt)], check=True)


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=True)


def test_file_pool_on_non_reflink_dir_is_a_loop_mounted_xfs_reflink_file(
        tmp_path: Path, image: Path, run_dir: Path) -> None:
    root = tmp_path / "pool"
    t = create_pool(root, backend="file", size=1 << 30, run_dir=run_dir)
    try:
        assert isinstance(t, FileTarget)
        pool_file = root / "pool.xfs"
        assert pool_file.stat().st_size == 1 << 30
        assert pool_file.stat().st_blocks * 512 < (1 << 30) // 4  # sparse (XFS log: 64 MiB)
        info = subprocess.run(["xfs_info", str(root / "data")], capture_output=True,
                              text=True, check=True).stdout
        assert "reflink=1" in info
        with open("/proc/mounts") as f:
            line = next(x for x in f if x.split()[1] == str(root / "data"))
        loopdev, fstype = line.split()[0], line.split()[2]
        assert fstype == "xfs"
        minor = os.minor(os.stat(loopdev).st_rdev)
        served = Path(f"/sys/block/loop{minor}/loop/backing_file").read_text().strip()
        assert served == str(pool_file)
        # host export: LOOP_CONFIGURE, autoclear off, direct I/O, backed by the clone file
        vol = t.clone(t.import_base(image, "b"), "v")
        dev = t.export(vol, ExportKind.HOST_BLOCK)
        sys_loop = Path(f"/sys/block/loop{dev.minor}/loop")
        assert (sys_loop / "backing_file").read_text().strip() == str(vol.path)
        assert (sys_loop / "autoclear").read_text().strip() == "0"
        assert (sys_loop / "dio").read_text().strip() == "1"  # 4 KiB ext4: DIO allowed
        assert Path(f"/sys/block/loop{dev.minor}/queue/logical_block_size").read_text() == "4096\n"
        losetup = json.loads(subprocess.run(["losetup", "-J", "-l"], capture_output=True,
                                            text=True, check=True).stdout)
        mine = [d for d in losetup["loopdevices"] if d["name"] == dev.path]
        assert mine[0]["back-file"] == str(vol.path) and mine[0]["dio"] is True
        # the pool survives its handle: unmount by hand, open_pool mounts it again
        t.unexport(vol)
        t.close()
        subprocess.run(["umount", str(root / "data")], check=True)
        subprocess.run(["losetup", "-d", loopdev], check=True)
        t = open_pool(root, run_dir=run_dir)
        assert [v.id for v in t.list().volumes] == ["v"]
        assert sha256(t.get_base("b").path) == sha256(image)
        # a pool inside a reflink-capable directory uses it directly (no pool file)
        inner = create_pool(root / "data" / "nested", backend="file", size=1 << 28,
                            run_dir=run_dir.parent / "run2")
        assert not (root / "data" / "nested" / "pool.xfs").exists()
        ivol = inner.clone(inner.import_base(image, "b"), "v")
        assert inner.export(ivol, ExportKind.HOST_BLOCK).path.startswith("/dev/loop")
        inner.destroy_pool(force=True)
        assert_no_leaks(root / "data" / "nested", run_dir.parent / "run2")
    finally:
        t.destroy_pool(force=True)
    assert_no_leaks(root, run_dir)
    with pytest.raises(PoolNotFound):
        open_pool(root, run_dir=run_dir)


def _sigkill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state == "Z":
            break
        time.sleep(0.01)


def test_qsd_daemon_restart_recreates_nodes_and_exports(tmp_path: Path, image: Path,
                                                       run_dir: Path) -> None:
    root = tmp_path / "pool"
    t = create_pool(root, backend="qsd", size=1 << 30, run_dir=run_dir)
    mnt = tmp_path / "mnt"
    try:
        assert isinstance(t, QsdTarget)
        base = t.import_base(image, "b")
        host = t.export(t.clone(base, "host"), ExportKind.HOST_BLOCK)
        nbd = t.export(t.clone(base, "nbd"), ExportKind.NBD)
        vhost = t.export(t.clone(base, "vhost"), ExportKind.VHOST_USER_BLK)
        _mount(host.path, mnt)
        (mnt / "before-crash.txt").write_text("kept\n")
        _umount(mnt)
        nodes_before, exports_before = t.qsd_nodes(), t.qsd_exports()
        old_pid = t.daemon_pid
        assert old_pid is not None
        _sigkill_and_wait(old_pid)
        assert t.daemon_pid is None
        # the next call notices, starts a new daemon and rebuilds everything from disk
        host2 = t.export("host", ExportKind.HOST_BLOCK)
        assert t.daemon_pid not in (None, old_pid)
        assert t.restarts == 1
        assert t.qsd_nodes() == nodes_before and t.qsd_exports() == exports_before
        assert t.export("nbd", ExportKind.NBD) == nbd
        assert t.export("vhost", ExportKind.VHOST_USER_BLK) == vhost
        assert Path(vhost.path).is_socket()
        _mount(host2.path, mnt)
        assert (mnt / "before-crash.txt").read_text() == "kept\n"
        _umount(mnt)
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -v 1080 2", nbd.path],
                             capture_output=True, text=True, check=True).stdout
        assert "53 ef" in out  # the ext4 magic 0xEF53, at 1024 + 0x38, read over NBD
    finally:
        for m in mounts_under(mnt):
            subprocess.run(["umount", "-l", m], check=False)
        t.destroy_pool(force=True)
    assert_no_leaks(root, run_dir)


def test_file_backend_processes_racing_on_the_same_50_ids(tmp_path: Path, image: Path,
                                                          run_dir: Path) -> None:
    """Per-id locks are flock(2) locks: they hold across processes, not only threads."""
    root = tmp_path / "pool"
    t = create_pool(root, backend="file", size=1 << 30, run_dir=run_dir)
    try:
        t.import_base(image, "b")
        procs = [subprocess.Popen(
            [sys.executable, "-m", "tests.root.block_worker", "churn", str(root), str(run_dir),
             "b", "ctr-", "50", str(seed)], stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).parents[2]) for seed in range(3)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0]
        assert all(o.strip() == "done" for o in outs)
        listed = {v.id: v for v in t.list().volumes}
        on_disk = {p.name[:-4] for p in t.volumes_dir.iterdir()}
        assert set(listed) == on_disk
        loops = loops_under(t.volumes_dir)
        assert len(loops) == sum(v.device is not None for v in listed.values())
        for v in listed.values():  # every recorded export is the kernel's truth
            if v.device is not None:
                backing = Path(f"/sys/block/loop{v.device.minor}/loop/backing_file")
                assert backing.read_text().strip() == str(v.path)
        for vid in listed:
            t.destroy(vid)
        assert loops_under(t.volumes_dir) == []
    finally:
        t.destroy_pool(force=True)
    assert_no_leaks(root, run_dir)
