"""The Kata VM path end to end: real kata-ipud, real QEMU (TCG), a real Debian guest running
this project's guest code (test agent over ttrpc on virtio-serial + guest_hooks + runc).

One VM boot serves the module (the hung-QEMU test boots its own, to SIGSTOP it). The guest
reports what it sees: each container prints its own files and its root mount from
/proc/mounts; the agent prints its /proc/self/mounts view after mounting and how many mounts
are left after removal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_hooks import oci
from kata_ipu import errors
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer, push
from tests.root.block_helpers import loops_under, mounts_under, qsd_processes
from tests.support import agentproto as ap
from tests.support.vmdriver import BRIDGE_SLOT, BRIDGE_SLOTS, KataVM, Shim

# the first test's setup may build the guest image and download the kernel (a cold cache);
# every wait inside has its own, shorter timeout
pytestmark = pytest.mark.timeout(900)

# prints what was there, writes its own mark, prints it back, then its root mount
EMPTY_SLOT = f"{BRIDGE_SLOT:02x}/{BRIDGE_SLOTS[-1]:02x}"  # a bridge slot nothing is plugged into
SCRIPT = ("cat /etc/motd; cat /mark 2>/dev/null || echo no-mark; echo mark-of-$(hostname) > /mark;"
          " cat /mark; grep ' / ' /proc/mounts")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KataVM, Shim, str, Path]]:
    require_root()
    require_programs("qemu-system-x86_64", "qemu-storage-daemon", "busybox", "apt-get",
                     "dpkg-deb", "debootstrap", "mkfs.ext4", "mkfs.xfs", "docker-registry",
                     "skopeo", "debugfs")
    work = tmp_path_factory.mktemp("vm")
    with RegistryServer(work / "reg") as reg:
        layout = OciLayout(work / "oci")
        base = LayerBuilder().tree(busybox_tree(work / "tree", applets=(
            "sh", "cat", "echo", "grep", "hostname", "ls", "sync", "sleep"))).build()
        top = LayerBuilder().file("etc/motd", b"image motd v1\n").build()
        layout.add_image([base, top], ref="v1")
        image = f"{reg.address}/vm/busybox:v1"
        push(work / "oci", "v1", image)
        (work / "ipud").mkdir()
        daemon = IpuDaemon(work / "ipud", pool_size="2G")
        daemon.start()
        try:
            with KataVM(work / "qemu") as vm:
                yield vm, Shim(vm, daemon.address), image, work / "ipud"
        finally:
            daemon.teardown()
    assert loops_under(work) == []
    assert mounts_under(work) == []
    assert qsd_processes(work) == []
    assert _qemu_processes(work) == []


def _assert_clean_host(shim: Shim, ipud_dir: Path) -> None:
    rootfs = shim.vm.run(shim._ipud("List", pb.ListRootfsRequest(), pb.ListRootfsResponse))
    assert list(rootfs.rootfs) == []
    assert loops_under(ipud_dir / "root" / "block" / "data") == []
    assert qsd_processes(ipud_dir) == []
    assert [p for p in ipud_dir.rglob("*.sock") if p.name not in ("ipud.sock", "notify.sock")] == []
    pci = str(shim.vm.qmp.execute("query-pci"))
    assert "virtio-drive-" not in pci and "virtio-blk-" not in pci
    assert shim.vm.qmp.execute("query-named-block-nodes") and not [
        n for n in shim.vm.qmp.execute("query-named-block-nodes")
        if str(n.get("node-name", "")).startswith("drive-")]


def test_four_containers_see_their_own_clones(env: tuple[KataVM, Shim, str, Path]) -> None:
    vm, shim, image, ipud_dir = env
    plan = [("c1", pb.HOST_BLOCK), ("c2", pb.HOST_BLOCK), ("c3", pb.HOST_BLOCK),
            ("c4", pb.VHOST_USER_BLK)]
    paths = {}
    for cid, export in plan:
        mark = vm.serial.mark()
        att, status, out = shim.run_container(cid, image, export, ["sh", "-c", SCRIPT])
        paths[cid] = att.pci_path
        assert re.fullmatch(r"02/[0-9a-f]{2}", att.pci_path), att.pci_path
        lines = out.splitlines()
        assert status == 0, out
        # the image content, no other container's mark, its own mark, a root mount of its own
        assert lines[:3] == ["image motd v1", "no-mark", f"mark-of-{cid}"], out
        assert re.match(r"^/dev/vd[a-z]+ / ext4 rw", lines[3]), out
        seen = vm.serial.wait(rf"AGENT-MOUNTED {cid} (\S+) (\S+) (\S+)", 30, mark)
        assert seen.group(1) == att.mount_point and seen.group(3) == "ext4"
        assert seen.group(2).startswith("/dev/vd")
    assert len(set(paths.values())) == 4
    for cid, _ in plan:
        mark = vm.serial.mark()
        shim.remove_container(cid)
        vm.serial.wait(rf"AGENT-REMOVED {cid} mounts-left=0", 30, mark)
    _assert_clean_host(shim, ipud_dir)


def test_erofs_export_is_read_only_under_an_overlay(env: tuple[KataVM, Shim, str, Path]) -> None:
    vm, shim, image, ipud_dir = env
    mark = vm.serial.mark()
    att, status, out = shim.run_container("e1", image, pb.HOST_BLOCK, ["sh", "-c", SCRIPT],
                                          fstype=pb.EROFS)
    assert status == 0, out
    lines = out.splitlines()
    assert lines[:3] == ["image motd v1", "no-mark", "mark-of-e1"], out
    assert lines[3].startswith("overlay / overlay rw"), out
    top = vm.serial.wait(r"AGENT-MOUNTED e1 (\S+) (\S+) overlay", 30, mark)
    assert top.group(1) == att.mount_point and top.group(2) == "overlay"
    lower = vm.serial.wait(r"AGENT-MOUNTED e1 (\S+) (\S+) erofs", 30, mark)
    assert lower.group(1) != att.mount_point and lower.group(2).startswith("/dev/vd")
    shim.remove_container("e1")
    vm.serial.wait(r"AGENT-REMOVED e1 mounts-left=0", 30, mark)
    _assert_clean_host(shim, ipud_dir)


def test_guest_hook_finds_the_disk_by_pci_path(env: tuple[KataVM, Shim, str, Path]) -> None:
    """No Storage: the agent runs the image's guest_hook_path prestart hook (``python3 -m
    guest_hooks hook``, OCI state on stdin), which finds the disk by the PCI path of the slot
    the VMM side plugged it into (no serial: Kata sets none, and neither does the driver) and
    mounts it at the bundle's root.path; the poststop hook unmounts it."""
    vm, shim, image, ipud_dir = env
    rootfs = shim.prepare("h1", image, pb.HOST_BLOCK)
    att = shim.hotplug("h1", rootfs)
    spec = ap.Spec(process=ap.Process(["sh", "-c", SCRIPT], ["PATH=/bin"]),
                   root_path=att.mount_point, hostname="h1", annotations={
                       oci.PCI_PATH: att.pci_path, oci.FSTYPE: "ext4"})
    mark = vm.serial.mark()
    vm.agent_call("CreateContainer", ap.CreateContainerRequest("h1", oci=spec).encode())
    created = vm.serial.wait(r"AGENT-CREATED h1 (.*)", 30, mark)
    assert "hooks=" in created.group(1)
    seen = vm.serial.wait(r"AGENT-MOUNTED h1 (\S+) (\S+) (\S+)", 30, mark)
    assert (seen.group(1), seen.group(3)) == (att.mount_point, "ext4")
    status, out = shim.start_and_wait("h1")
    assert status == 0 and out.splitlines()[:3] == ["image motd v1", "no-mark", "mark-of-h1"]
    shim.remove_container("h1")
    vm.serial.wait(r"AGENT-REMOVED h1 mounts-left=0", 30, mark)
    _assert_clean_host(shim, ipud_dir)


def test_device_never_arrives_agent_keeps_serving(env: tuple[KataVM, Shim, str, Path]) -> None:
    vm, _shim, _image, _ = env
    req = ap.CreateContainerRequest("ghost", storages=[ap.Storage(
        "blk", EMPTY_SLOT, "ext4", "/run/kata-containers/shared/containers/ghost")], oci=ap.Spec(
        process=ap.Process(["true"]), root_path="/run/kata-containers/shared/containers/ghost"))
    with pytest.raises(errors.DeadlineExceeded, match="device-timeout"):
        vm.agent_call("CreateContainer", req.encode())
    with pytest.raises(errors.NotFound):
        vm.agent_call("StartContainer", ap.ContainerRequest("ghost").encode())


def test_wrong_fstype_is_refused(env: tuple[KataVM, Shim, str, Path]) -> None:
    vm, shim, image, ipud_dir = env
    rootfs = shim.prepare("badfs", image, pb.HOST_BLOCK)
    att = shim.hotplug("badfs", rootfs)
    try:
        with pytest.raises(errors.InvalidArgument, match=r"wrong-fstype.*expected a erofs"):
            vm.agent_call("CreateContainer", shim.create_request(att, ["true"], "erofs"))
    finally:
        shim.unplug(att)
        shim.release("badfs")
    _assert_clean_host(shim, ipud_dir)


def test_fsck_errors_refuse_the_mount(env: tuple[KataVM, Shim, str, Path]) -> None:
    vm, shim, image, ipud_dir = env
    rootfs = shim.prepare("broken", image, pb.HOST_BLOCK)
    # damage the clone through its host export: clear the root directory's inode and record
    # the error in the superblock, as the kernel does when it meets one
    for cmd in ("clri <2>", "ssv state 2"):
        subprocess.run(["debugfs", "-w", "-R", cmd, rootfs.device.path], check=True,
                       capture_output=True, timeout=60)
    att = shim.hotplug("broken", rootfs)
    try:
        with pytest.raises(errors.DataLoss, match=r"fsck-failed: .*e2fsck -p exited"):
            vm.agent_call("CreateContainer", shim.create_request(att, ["true"]))
    finally:
        shim.unplug(att)
        shim.release("broken")
    _assert_clean_host(shim, ipud_dir)


def test_already_mounted_target_is_refused(env: tuple[KataVM, Shim, str, Path]) -> None:
    vm, shim, image, ipud_dir = env
    first = shim.hotplug("am1", shim.prepare("am1", image, pb.HOST_BLOCK))
    vm.agent_call("CreateContainer", shim.create_request(first, ["sh", "-c", ":"]))
    second = shim.hotplug("am2", shim.prepare("am2", image, pb.HOST_BLOCK))
    try:
        req = ap.CreateContainerRequest("am2", storages=[ap.Storage(
            "blk", second.pci_path, "ext4", first.mount_point)], oci=ap.Spec(
            process=ap.Process(["true"]), root_path=first.mount_point))
        with pytest.raises(errors.AlreadyExists, match="already-mounted"):
            vm.agent_call("CreateContainer", req.encode())
    finally:
        shim.unplug(second)
        shim.release("am2")
        shim.remove_container("am1")
    _assert_clean_host(shim, ipud_dir)


def test_surprise_removal_while_mounted(env: tuple[KataVM, Shim, str, Path]) -> None:
    vm, shim, image, ipud_dir = env
    rootfs = shim.prepare("gone", image, pb.HOST_BLOCK)
    att = shim.hotplug("gone", rootfs)
    mark = vm.serial.mark()
    vm.agent_call("CreateContainer", shim.create_request(att, ["sh", "-c", "echo hi"]))
    vm.serial.wait(r"AGENT-MOUNTED gone ", 30, mark)
    shim.unplug(att)  # the disk goes away under the mounted filesystem
    shim.vm.agent_call("RemoveContainer",
                       ap.ContainerRequest("gone", timeout=30).encode_remove())
    vm.serial.wait(r"AGENT-REMOVED gone mounts-left=0", 30, mark)
    shim.release("gone")
    _assert_clean_host(shim, ipud_dir)
    # the guest is still usable afterwards
    _att, status, out = shim.run_container("after", image, pb.HOST_BLOCK,
                                           ["sh", "-c", "cat /etc/motd"])
    assert (status, out) == (0, "image motd v1\n")
    shim.remove_container("after")
    _assert_clean_host(shim, ipud_dir)


def test_hung_qemu_is_killed(tmp_path: Path) -> None:
    """A QEMU that stops answering (SIGSTOP: QMP ``quit`` times out) is killed by the
    fixture's stop(), and its sockets are removed."""
    require_root()
    with KataVM(tmp_path / "hung") as vm:
        assert vm.proc is not None
        os.kill(vm.proc.pid, signal.SIGSTOP)
    assert vm.proc is None
    assert not (tmp_path / "hung" / "qmp.sock").exists()
    assert not (tmp_path / "hung" / "agent.sock").exists()
    assert _qemu_processes(tmp_path) == []


def _qemu_processes(marker: Path) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and str(marker).encode() in cmd:
            pids.append(int(pid))
    return pids
