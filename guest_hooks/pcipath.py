"""Kata's PCI path (``02/01``: slots from the root bus down) and its sysfs resolution.

The agent's algorithm (``pcipath_to_sysfs`` in Kata's agent): the first hop is a slot on the
root bus ``0000:<rc>``; for every further hop, read the bus the previous hop (a bridge or root
port) exposes from ``<bridge>/pci_bus/`` and take that slot on it. The last hop is the device
itself, which may not exist yet: a disk is then recognised by a block uevent whose DEVPATH is
``/devices/pci0000:<rc><relpath>/virtio<N>/block/<name>``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from guest_hooks.errors import InvalidArgument

_SLOT = re.compile(r"^[0-9a-fA-F]{1,2}$")
_MAX_SLOT = 0x1F


@dataclass(frozen=True)
class PciPath:
    """Slots from the root bus down, e.g. ``PciPath((2, 1))`` for ``02/01``."""

    slots: tuple[int, ...]
    root_complex: str = "00"

    @classmethod
    def parse(cls, text: str) -> PciPath:
        """Parse ``02/01`` (Kata's format); an optional ``pci0000:RC/`` prefix names a root
        complex other than ``00``."""
        root = "00"
        rest = text.strip()
        m = re.match(r"^pci0000:([0-9a-fA-F]{2})/(.*)$", rest)
        if m:
            root, rest = m.group(1).lower(), m.group(2)
        if not rest:
            raise InvalidArgument(f"PCI path {text!r} is empty")
        slots: list[int] = []
        for part in rest.split("/"):
            if not _SLOT.match(part):
                raise InvalidArgument(f"PCI path {text!r}: {part!r} is not a hex slot")
            slot = int(part, 16)
            if slot > _MAX_SLOT:
                raise InvalidArgument(f"PCI path {text!r}: slot {part} is above 1f")
            slots.append(slot)
        return cls(tuple(slots), root)

    def __str__(self) -> str:
        return "/".join(f"{s:02x}" for s in self.slots)

    @property
    def root_bus(self) -> str:
        return f"pci0000:{self.root_complex}"

    def relpath(self, sysfs_devices: str = "/sys/devices") -> str:
        """``/0000:00:02.0/0000:01:01.0`` below the root bus, resolving each bridge's secondary
        bus from sysfs; raises :class:`InvalidArgument` when a bridge on the path is missing."""
        bus = f"0000:{self.root_complex}"
        rel = ""
        for i, slot in enumerate(self.slots):
            rel += f"/{bus}:{slot:02x}.0"
            if i == len(self.slots) - 1:
                break
            bridge_bus = os.path.join(sysfs_devices, self.root_bus) + rel + "/pci_bus"
            try:
                buses = os.listdir(bridge_bus)
            except OSError as exc:
                raise InvalidArgument(
                    f"PCI path {self}: no bridge at {bridge_bus.rsplit('/', 1)[0]}") from exc
            if len(buses) != 1:
                raise InvalidArgument(f"PCI path {self}: {bridge_bus} lists {buses!r}")
            bus = buses[0]
        return rel

    def block_devpath_pattern(self, sysfs_devices: str = "/sys/devices") -> re.Pattern[str]:
        """What Kata's ``VirtioBlkPciMatcher`` matches: the uevent DEVPATH of the disk."""
        prefix = f"/devices/{self.root_bus}{self.relpath(sysfs_devices)}"
        return re.compile("^" + re.escape(prefix) + r"/virtio[0-9]+/block/[^/]+$")
