"""Kata PCI paths: parsing, hop-by-hop sysfs resolution, the uevent DEVPATH pattern, and the
disk scan by PCI path, against a fake sysfs tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guest_hooks import __main__ as cli
from guest_hooks.device import Locator, scan
from guest_hooks.errors import DeviceTimeout, InvalidArgument
from guest_hooks.pcipath import PciPath


def test_parse_and_format() -> None:
    assert PciPath.parse("02/01") == PciPath((2, 1))
    assert str(PciPath.parse("2/1f")) == "02/1f"
    assert PciPath.parse("pci0000:01/06/00") == PciPath((6, 0), "01")


@pytest.mark.parametrize("bad", ["", "02/", "/01", "zz/01", "20/00", "002/01", "02//01"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        PciPath.parse(bad)


def _fake_sysfs(tmp: Path) -> tuple[Path, Path]:
    devices = tmp / "devices"
    port = devices / "pci0000:00/0000:00:06.0"
    (port / "pci_bus/0000:03").mkdir(parents=True)
    disk = port / "0000:03:00.0/virtio4/block/vdc"
    disk.mkdir(parents=True)
    (disk / "device").mkdir()
    (disk / "serial").write_text("ipu-c1\n")
    (disk / "ro").write_text("0\n")
    root = devices / "pci0000:00/0000:00:04.0/virtio0/block/vda"
    root.mkdir(parents=True)
    (root / "device").mkdir()
    (root / "serial").write_text("kata-guest-root\n")
    (root / "ro").write_text("1\n")
    sys_block = tmp / "class/block"
    sys_block.mkdir(parents=True)
    os.symlink(disk, sys_block / "vdc")
    os.symlink(root, sys_block / "vda")
    return devices, sys_block


def test_relpath_follows_the_bridge_bus(tmp_path: Path) -> None:
    devices, _ = _fake_sysfs(tmp_path)
    path = PciPath.parse("06/00")
    assert path.relpath(str(devices)) == "/0000:00:06.0/0000:03:00.0"
    rx = path.block_devpath_pattern(str(devices))
    assert rx.match("/devices/pci0000:00/0000:00:06.0/0000:03:00.0/virtio4/block/vdc")
    assert not rx.match("/devices/pci0000:00/0000:00:06.0/0000:03:00.0/virtio4/block/vdc/vdc1")
    assert not rx.match("/devices/pci0000:00/0000:00:07.0/0000:04:00.0/virtio5/block/vdd")


def test_relpath_without_bridge_is_a_clear_error(tmp_path: Path) -> None:
    devices, _ = _fake_sysfs(tmp_path)
    with pytest.raises(InvalidArgument, match="no bridge"):
        PciPath.parse("09/00").relpath(str(devices))


def test_scan_by_pci_path_never_by_serial(tmp_path: Path) -> None:
    devices, sys_block = _fake_sysfs(tmp_path)
    found = scan(Locator(PciPath.parse("06/00")), str(sys_block), str(devices))
    assert found is not None and found.name == "vdc" and found.node == "/dev/vdc"
    assert not found.readonly and found.serial == "ipu-c1"  # read for messages only
    assert scan(Locator(PciPath.parse("06/01")), str(sys_block), str(devices)) is None
    # one hop: the root bus's slot 4, the guest's own root disk
    root = scan(Locator(PciPath.parse("04")), str(sys_block), str(devices))
    assert root is not None and root.name == "vda" and root.readonly


def test_the_command_line_has_no_serial_lookup() -> None:
    with pytest.raises(SystemExit):
        cli.run(["mount", "--serial", "ipu-c1", "--target", "/x"])


def test_timeout_error_names_what_is_present() -> None:
    err = DeviceTimeout("pci-path=06/00", 3, ["vda /devices/x serial='r'"])
    assert "within 3s" in str(err) and "vda /devices/x" in str(err)
    assert err.kind == "device-timeout"
