r"""A host-side driver for VM tests that plays Kata's shim (shared/notes/kata.md §1, §4).

:class:`KataVM` boots the test guest (:mod:`tests.support.guestimage`) with QEMU TCG on q35,
memfd shared RAM (vhost-user needs it), a hot-plug ``pci-bridge`` (see below), and the
agent's virtio-serial port
``agent.channel.0`` whose host end is a unix socket the ttrpc client dials.

:class:`Shim` does, per container, what Kata's runtime does for a block-device rootfs:
``RootfsService.Prepare`` on ``kata-ipud``; hot-plug with Kata's QMP sequence (``blockdev-add``
+ ``device_add virtio-blk-pci`` on a free bridge slot, or ``chardev-add`` + ``device_add
vhost-user-blk-pci``); the real PCI path from ``query-pci``; ``CreateContainer`` with
``Storage{driver:"blk", source:<PCI path>, fstype, mount_point}``. Removal is
``RemoveContainer`` → ``device_del`` → ``DEVICE_DELETED`` → ``blockdev-del`` (or
``chardev-remove``) → ``RemoveContainer.Release``.

Like Kata's Go runtime on q35, disks go onto ``pci-bridge-0`` at slot 2
(``bridgePCIStartAddr``), slots 1..30, giving PCI paths like ``02/01``. The bridge is created
with I/O and memory window reservations: SeaBIOS gives an empty bridge no windows, and the
guest then enumerates a hot-plugged device but cannot assign its BARs (``virtio-pci: probe
... failed with error -5``), so the disk never appears.

Every wait has a timeout; the VM runs in its own process group and is killed if it does not
quit. Nothing runs at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kata_ipu.api import ROOTFS_SERVICE
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.block.qsd import QmpLink
from kata_ipu.executor import DEFAULT, Executor
from kata_ipu.ttrpc import Client
from tests.support import agentproto as ap
from tests.support.guest import Guest, Serial, kernel
from tests.support.guestimage import (
    AGENT_PORT,
    GUEST_HOOK_PATH,
    ROOT_SERIAL,
    boot_initramfs,
    root_image,
)

T = TypeVar("T")
BRIDGE = "pci-bridge-0"
BRIDGE_SLOT = 2
BRIDGE_SLOTS = range(1, 31)  # Kata: 1..MaxCapacity; slot 0 is not hot-pluggable on a bridge
SHARED_DIR = "/run/kata-containers/shared/containers"


class _Loop:
    """A private asyncio loop in a thread, for the sync test API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vmdriver",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


class KataVM(Guest):
    """The test guest booted into the test agent; ``agent`` is a ttrpc client to it."""

    def __init__(self, workdir: Path, *, memory: int = 768, hotplug_timeout: float = 5.0,
                 boot_timeout: float = 240.0, executor: Executor = DEFAULT) -> None:
        super().__init__(workdir, memory=memory, root_ports=0, boot_timeout=boot_timeout,
                         executor=executor)
        self.hotplug_timeout = hotplug_timeout
        self.agent_sock = workdir / "agent.sock"
        self.build_log: list[str] = []
        self._aloop: _Loop | None = None
        self._agent: Client | None = None
        self.boot_seconds = 0.0

    def vm_argv(self, vmlinuz: Path, initrd: Path, root: Path) -> list[str]:
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", str(self.memory),
            "-smp", "1", "-nographic", "-no-reboot", "-nic", "none", "-vga", "none",
            "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-object", f"memory-backend-memfd,id=mem,size={self.memory}M,share=on",
            "-numa", "node,memdev=mem",
            "-drive", f"file={root},if=none,id=rootdisk,format=raw,readonly=on",
            "-device", f"virtio-blk-pci,drive=rootdisk,serial={ROOT_SERIAL},addr=4",
            "-device", "virtio-serial-pci,id=vser0,addr=5",
            "-chardev", f"socket,id=agentchr,path={self.agent_sock},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=agentchr,name={AGENT_PORT}",
            "-device", f"pci-bridge,bus=pcie.0,id={BRIDGE},chassis_nr=1,shpc=off,"
                       f"addr={BRIDGE_SLOT},io-reserve=4k,mem-reserve=4M,pref64-reserve=4M",
        ]

    def start(self) -> KataVM:
        k = kernel(self.executor)
        root = root_image(self.executor, log=self.build_log)
        initrd = boot_initramfs(k, ["--port", AGENT_PORT,
                                    "--hotplug-timeout", f"{self.hotplug_timeout:g}",
                                    "--guest-hook-path", GUEST_HOOK_PATH])
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sock in (self.qmp_sock, self.agent_sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        started = time.monotonic()
        self.proc = subprocess.Popen(self.vm_argv(k.vmlinuz, initrd, root),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        assert self.proc.stdout is not None
        self._serial = Serial(self.proc.stdout)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while not (self.qmp_sock.exists() and self.agent_sock.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu did not start:\n{self._serial.text()}")
            time.sleep(0.01)
        self._qmp = QmpLink(self.qmp_sock, name="kata-vm")
        self._qmp.connect()
        self._aloop = _Loop()
        # connect before the guest opens its port: the guest then sees the host connected
        self._agent = self._aloop.run(Client.connect(f"unix://{self.agent_sock}"), 30)
        self._serial.wait(r"AGENT-READY", self.boot_timeout)
        self.boot_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self._aloop is not None:
            if self._agent is not None:
                with contextlib.suppress(Exception):
                    self._aloop.run(self._agent.close(), 5)
            self._aloop.close()
            self._agent = None
            self._aloop = None
        super().stop()
        with contextlib.suppress(FileNotFoundError):
            self.agent_sock.unlink()

    def __enter__(self) -> KataVM:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        assert self._aloop is not None, "VM not started"
        return self._aloop.run(coro, timeout)

    def agent_call(self, method: str, payload: bytes, timeout: float = 60.0) -> bytes:
        agent = self._agent
        assert agent is not None, "VM not started"
        return self.run(agent.call(ap.SERVICE, method, payload, timeout=timeout), timeout + 5)

    # -- PCI --------------------------------------------------------------------------------
    def pci_path(self, qdev_id: str) -> str:
        """The Kata PCI path (``02/01``) of a device, read back with ``query-pci``."""
        def walk(devices: list[dict[str, Any]], prefix: list[int]) -> list[int] | None:
            for dev in devices:
                here = [*prefix, int(dev["slot"])]
                if dev.get("qdev_id") == qdev_id:
                    return here
                bridge = dev.get("pci_bridge")
                if bridge:
                    found = walk(bridge.get("devices", []), here)
                    if found is not None:
                        return found
            return None

        for bus in self.qmp.execute("query-pci"):
            found = walk(bus.get("devices", []), [])
            if found is not None:
                return "/".join(f"{s:02x}" for s in found)
        raise LookupError(f"{qdev_id} not in query-pci")


@dataclass
class Attached:
    cid: str
    kind: int  # pb.ExportKind
    qdev_id: str
    backend_id: str  # blockdev node-name or chardev id
    slot: int  # on pci-bridge-0
    pci_path: str
    rootfs: Any  # pb.Rootfs
    mount_point: str


class Shim:
    """The Kata-shim stand-in: kata-ipud → QMP hot-plug → agent, and back."""

    def __init__(self, vm: KataVM, ipud_address: str) -> None:
        self.vm = vm
        self.ipud_address = ipud_address
        self.attached: dict[str, Attached] = {}
        self._next = 0

    async def _ipud(self, method: str, req: Any, resp: Any, timeout: float = 300) -> Any:
        async with await Client.connect(self.ipud_address) as c:
            return await c.call_message(ROOTFS_SERVICE, method, req, resp, timeout=timeout)

    def prepare(self, cid: str, image: str, export: int, fstype: int = 0) -> Any:
        """``RootfsService.Prepare``; ``fstype`` is a ``pb.FsType`` (0: the daemon's default)."""
        resp = self.vm.run(self._ipud("Prepare", pb.PrepareRequest(
            container_id=cid, image=image, export=export,  # type: ignore[arg-type]
            options=pb.PrepareOptions(fstype=fstype)),  # type: ignore[arg-type]
            pb.PrepareResponse), 320)
        return resp.rootfs

    def release(self, cid: str) -> None:
        self.vm.run(self._ipud("Release", pb.ReleaseRequest(container_id=cid),
                               pb.ReleaseResponse), 120)

    def _free_slot(self) -> int:
        used = {a.slot for a in self.attached.values()}
        for slot in BRIDGE_SLOTS:
            if slot not in used:
                return slot
        raise RuntimeError(f"{BRIDGE} is full")

    def hotplug(self, cid: str, rootfs: Any) -> Attached:
        """Kata's hot-plug sequence for the export in ``rootfs.device``; returns the
        attachment with the PCI path read back from QEMU."""
        dev = rootfs.device
        self._next += 1
        slot = self._free_slot()
        qmp = self.vm.qmp
        if dev.kind == pb.VHOST_USER_BLK:
            chardev, qdev = f"blk-{cid}", f"virtio-blk-{cid}"
            qmp.execute("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
                "server": False, "addr": {"type": "unix", "data": {"path": dev.vhost_socket}}}}})
            try:
                qmp.execute("device_add", {"driver": "vhost-user-blk-pci", "id": qdev,
                                           "chardev": chardev, "addr": f"{slot:#x}",
                                           "bus": BRIDGE})
            except BaseException:
                qmp.execute("chardev-remove", {"id": chardev})
                raise
            backend = chardev
        else:
            node, qdev = f"drive-{cid}", f"virtio-drive-{cid}"
            qmp.execute("blockdev-add", {"driver": "raw", "node-name": node,
                                         "read-only": bool(dev.read_only),
                                         "file": {"driver": "host_device",
                                                  "filename": dev.path, "aio": "threads"}})
            args: dict[str, Any] = {"id": qdev, "driver": "virtio-blk-pci", "drive": node,
                                    "addr": f"{slot:#x}", "bus": BRIDGE, "share-rw": True,
                                    "romfile": ""}
            # no "serial": Kata's executePCIDeviceAdd sets none, so nothing may depend on it
            try:
                qmp.execute("device_add", args)
            except BaseException:
                qmp.execute("blockdev-del", {"node-name": node})
                raise
            backend = node
        att = Attached(cid, dev.kind, qdev, backend, slot, self.vm.pci_path(qdev), rootfs,
                       f"{SHARED_DIR}/{cid}")
        self.attached[cid] = att
        return att

    def unplug(self, att: Attached, timeout: float = 60.0) -> None:
        self.vm.qmp.execute_wait_event("device_del", {"id": att.qdev_id}, "DEVICE_DELETED",
                                       {"device": att.qdev_id}, timeout)
        if att.kind == pb.VHOST_USER_BLK:
            self.vm.qmp.execute("chardev-remove", {"id": att.backend_id})
        else:
            self.vm.qmp.execute("blockdev-del", {"node-name": att.backend_id})
        self.attached.pop(att.cid, None)

    def create_request(self, att: Attached, args: list[str], fstype: str = "ext4",
                       source: str | None = None) -> bytes:
        storage = ap.Storage(driver="blk", source=source or att.pci_path, fstype=fstype,
                             mount_point=att.mount_point)
        spec = ap.Spec(process=ap.Process(args=args, env=["PATH=/bin:/sbin"], cwd="/"),
                       root_path=att.mount_point, hostname=att.cid)
        return ap.CreateContainerRequest(att.cid, storages=[storage], oci=spec).encode()

    def run_container(self, cid: str, image: str, export: int, args: list[str],
                      timeout: float = 120.0, fstype: int = 0) -> tuple[Attached, int, str]:
        """Prepare, hot-plug, create, start, wait; returns (attachment, exit status, stdout)."""
        rootfs = self.prepare(cid, image, export, fstype)
        att = self.hotplug(cid, rootfs)
        fs = "erofs" if rootfs.device.fstype == pb.EROFS else "ext4"
        self.vm.agent_call("CreateContainer", self.create_request(att, args, fs), timeout)
        status, out = self.start_and_wait(cid, timeout)
        return att, status, out

    def start_and_wait(self, cid: str, timeout: float = 120.0) -> tuple[int, str]:
        req = ap.ContainerRequest(cid)
        self.vm.agent_call("StartContainer", req.encode(), timeout)
        status = ap.decode_wait_response(
            self.vm.agent_call("WaitProcess", req.encode(), timeout))
        chunks = []
        while True:
            data = ap.decode_read_response(self.vm.agent_call(
                "ReadStdout", ap.ContainerRequest(cid, length=65536).encode(), timeout))
            if not data:
                break
            chunks.append(data)
        return status, b"".join(chunks).decode("utf-8", "replace")

    def remove_container(self, cid: str, timeout: float = 60.0) -> None:
        """RemoveContainer (unmount in the guest) → unplug → Release."""
        self.vm.agent_call("RemoveContainer",
                           ap.ContainerRequest(cid, timeout=30).encode_remove(), timeout)
        att = self.attached.get(cid)
        if att is not None:
            self.unplug(att, timeout)
        self.release(cid)
