"""Find a hot-plugged disk by its Kata PCI path, waiting on kernel uevents.

Never guesses ``/dev/vdX``: a disk is identified only by where the host put it, its PCI path
(``<bridge slot>/<device slot>``, read back with ``query-pci``), which is what Kata gives its
agent (``Storage.source`` of driver ``blk``). Not by a virtio serial: Kata's ``device_add``
sets none (``qemu.go: hotplugAddBlockDevice`` → ``executePCIDeviceAdd``).

The wait is race-free: the netlink monitor is started *before* sysfs is scanned for a disk that
is already there, so an add event between the two cannot be missed. Kernel uevents are read
directly (pyudev ``source="kernel"``), as Kata's agent does; no udevd needed.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from guest_hooks.errors import DeviceTimeout
from guest_hooks.pcipath import PciPath

SYS_BLOCK = "/sys/class/block"


@dataclass(frozen=True)
class BlockDevice:
    name: str  # vdb
    node: str  # /dev/vdb
    devpath: str  # /devices/pci0000:00/.../virtio3/block/vdb
    serial: str  # shown when the disk is not found; never used to find it
    readonly: bool


@dataclass(frozen=True)
class Locator:
    """How to recognise the disk: its PCI path."""

    pci_path: PciPath

    def __str__(self) -> str:
        return f"pci-path={self.pci_path}"

    def matcher(self, sysfs_devices: str = "/sys/devices") -> Callable[[str], bool]:
        """``match(devpath) -> bool`` for a disk."""
        rx: re.Pattern[str] = self.pci_path.block_devpath_pattern(sysfs_devices)
        return lambda devpath: rx.match(devpath) is not None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _describe(name: str, sys_block: str = SYS_BLOCK,
              sysfs_devices: str = "/sys/devices") -> BlockDevice | None:
    base = os.path.join(sys_block, name)
    try:
        real = os.path.realpath(base)
    except OSError:
        return None
    if not os.path.exists(os.path.join(base, "device")) or os.path.exists(
            os.path.join(base, "partition")):
        return None  # not a whole disk (partition, loop, ram...)
    # the uevent DEVPATH form: /devices/... (sysfs_devices is /sys/devices but for tests)
    devpath = ("/devices" + real[len(sysfs_devices):]
               if real.startswith(sysfs_devices + "/") else real)
    return BlockDevice(name, f"/dev/{name}", devpath, _read(os.path.join(base, "serial")),
                       _read(os.path.join(base, "ro")) == "1")


def scan(locator: Locator, sys_block: str = SYS_BLOCK,
         sysfs_devices: str = "/sys/devices") -> BlockDevice | None:
    """The matching disk if it is already present."""
    match = locator.matcher(sysfs_devices)
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return None
    for name in names:
        dev = _describe(name, sys_block, sysfs_devices)
        if dev is not None and match(dev.devpath):
            return dev
    return None


def _wait_node(dev: BlockDevice, deadline: float, timeout: float) -> BlockDevice:
    # devtmpfs creates the node before the uevent is sent; this only covers a missing devtmpfs
    while not os.path.exists(dev.node):
        if time.monotonic() >= deadline:
            raise DeviceTimeout(f"node {dev.node}", timeout)
        time.sleep(0.01)
    return dev


def _present(sys_block: str = SYS_BLOCK) -> list[str]:
    """``name devpath serial=...`` of every disk now present, for error messages."""
    out = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(sys_block)):
            dev = _describe(name, sys_block)
            if dev is not None:
                out.append(f"{name} {dev.devpath} serial={dev.serial!r}")
    return out


def wait_for_disk(locator: Locator, timeout: float = 3.0) -> BlockDevice:
    """Wait until the disk is present; :class:`DeviceTimeout` after ``timeout`` seconds
    (Kata's ``agent.hotplug_timeout`` default is 3 s)."""
    import pyudev  # noqa: PLC0415 - imported when needed: unit tests of the rest need no libudev

    deadline = time.monotonic() + timeout
    match = locator.matcher()
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.filter_by("block")
    monitor.start()  # subscribe first, then scan: no add event can fall in between
    found = scan(locator)
    if found is not None:
        return _wait_node(found, deadline, timeout)
    while True:  # the monitor's socket is released with the object (libudev unref)
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeviceTimeout(str(locator), timeout, present=_present())
        device = monitor.poll(timeout=left)
        if device is None or device.action != "add" or device.device_type != "disk":
            continue
        dev = _describe(device.sys_name)
        if dev is None:
            continue  # added and already gone again
        if match(dev.devpath):
            return _wait_node(dev, deadline, timeout)
