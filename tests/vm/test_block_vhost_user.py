"""A real ``qemu-system-x86_64 -accel tcg`` guest hot-plugs each backend's vhost-user-blk
export over QMP (``chardev-add`` + ``device_add vhost-user-blk-pci``), reads a known file
from it, writes one, and is unplugged; the host then finds the guest's write in the clone and
the base unchanged."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu.block import BACKENDS, ExportKind, create_pool
from kata_ipu.testing.prereq import require_programs, require_root
from tests.root.block_helpers import assert_no_leaks, make_ext4, sha256
from tests.support.guest import Guest


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    require_root()
    require_programs("qemu-system-x86_64", "qemu-storage-daemon", "qemu-img", "busybox",
                     "apt-get", "dpkg-deb", "mkfs.ext4", "mkfs.xfs")
    with Guest(tmp_path_factory.mktemp("guest")) as g:
        yield g


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_guest_hotplugs_vhost_user_blk_export(backend: str, guest: Guest,
                                             tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello from the base image\n")
    image = make_ext4(tmp_path / "base.ext4", tree, 32)
    run_dir = Path(tempfile.mkdtemp(prefix="kbv-", dir="/tmp")) / "run"
    root = tmp_path / "pool"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    t = create_pool(root, backend=backend, size=1 << 30, run_dir=run_dir)
    try:
        base = t.import_base(image, "base")
        vol = t.clone(base, f"vm-{backend}")
        # mark the clone through the host export, so the guest can tell it from the base
        dev = t.export(vol, ExportKind.HOST_BLOCK)
        subprocess.run(["mount", dev.path, str(mnt)], check=True)
        (mnt / "volume.txt").write_text(f"volume {vol.id}\n")
        subprocess.run(["umount", str(mnt)], check=True)
        t.unexport(vol)

        vhost = t.export(vol, ExportKind.VHOST_USER_BLK)
        assert vhost.socket and Path(vhost.socket).is_socket()
        dev_id = f"vblk-{backend}"
        mark = guest.serial.mark()
        guest.hotplug_vhost_user_blk(vhost.socket, dev_id, bus="rp1")
        added = guest.serial.wait(r"GUEST-DISK-ADDED (vd\w+) serial=(\S*)", 60, mark)
        disk = added.group(1)
        # qemu-storage-daemon 7.2 answers VIRTIO_BLK_T_GET_ID with a fixed string
        assert added.group(2) == "vhost_user_blk"
        guest.serial.wait(rf"GUEST-FILE {disk} hello.txt hello from the base image", 60, mark)
        guest.serial.wait(rf"GUEST-FILE {disk} volume.txt volume {vol.id}", 60, mark)
        guest.serial.wait(rf"GUEST-WROTE {disk}", 60, mark)
        guest.serial.wait(rf"GUEST-DISK-DONE {disk}", 60, mark)
        guest.unplug(dev_id, chardev=f"{dev_id}-chr")
        guest.serial.wait(rf"GUEST-DISK-REMOVED {disk}", 60, mark)
        t.unexport(vol)

        dev = t.export(vol, ExportKind.HOST_BLOCK)
        subprocess.run(["mount", dev.path, str(mnt)], check=True)
        try:
            assert (mnt / "guest-wrote.txt").read_text() == f"written by the guest on {disk}\n"
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert sha256(base.path) == sha256(image)
    finally:
        t.destroy_pool(force=True)
    assert_no_leaks(root, run_dir)
    shutil.rmtree(run_dir.parent, ignore_errors=True)
