"""Typed objects of the block target: pools, bases, volumes, devices, and their states.

Identifiers are validated at the boundary (:func:`check_id`), and every device carries a
virtio-blk serial derived from its volume id (:func:`serial_for`).
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from kata_ipu.block.errors import BadId, IllegalTransition

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SERIAL_MAX = 20  # virtio-blk VIRTIO_BLK_ID_BYTES


class ExportKind(enum.Enum):
    """How a volume is presented to its consumer."""

    HOST_BLOCK = "host-block"  # a block device node on this host (/dev/loopN)
    VHOST_USER_BLK = "vhost-user-blk"  # a vhost-user-blk unix socket for a VM
    NBD = "nbd"  # an NBD export on a unix socket (userspace clients only here)
    FUSE = "fuse"  # a regular file presenting the disk through FUSE
    VFIO_PCI = "vfio-pci"  # an SR-IOV virtual function: hardware IPU only


class State(enum.Enum):
    """Lifecycle of a base or volume record on disk.

    ``CREATING`` and ``DESTROYING`` are intent states written before the data changes; a record
    found in either state without its lock held is the trace of a crash and is rolled
    (back or forward) by recovery. Only ``READY`` and ``EXPORTED`` objects are listed.
    """

    CREATING = "creating"
    READY = "ready"
    EXPORTED = "exported"
    DESTROYING = "destroying"


# The legal record transitions (None: no record yet). Anything else is a bug, caught by
# :func:`check_transition` before the record is written.
TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({State.CREATING}),
    State.CREATING: frozenset({State.READY, State.DESTROYING}),
    State.READY: frozenset({State.EXPORTED, State.DESTROYING}),
    State.EXPORTED: frozenset({State.EXPORTED, State.READY, State.DESTROYING}),
    State.DESTROYING: frozenset({State.DESTROYING}),
}


def check_transition(what: str, object_id: str, old: State | None, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(what, object_id, old, new)


def check_id(what: str, value: object) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise BadId(what, value, "1-128 characters of [A-Za-z0-9_.-], not starting with . - _")
    return value


def serial_for(volume_id: str) -> str:
    """A stable virtio-blk serial (<= 20 bytes) for ``volume_id``.

    Short ids are used as they are, so a guest can find ``/sys/block/vd*/serial == id``;
    longer ids become a 7-character prefix plus 12 hex digits of their SHA-256.
    """
    check_id("volume", volume_id)
    if len(volume_id) <= SERIAL_MAX:
        return volume_id
    digest = hashlib.sha256(volume_id.encode()).hexdigest()[:12]
    return f"{volume_id[:7]}-{digest}"


def short_name(prefix: str, object_id: str) -> str:
    """A short, unique name for QSD node/export ids and socket files."""
    return f"{prefix}{hashlib.sha256(object_id.encode()).hexdigest()[:16]}"


@dataclass(frozen=True, slots=True)
class Pool:
    root: Path
    backend: str
    capacity: int
    data_dir: Path


@dataclass(frozen=True, slots=True)
class Base:
    """A read-only snapshot: an imported image no one writes to again."""

    id: str
    path: Path
    size: int
    digest: str
    state: State = State.READY


@dataclass(frozen=True, slots=True)
class Device:
    """An export of a volume: what a consumer needs to attach it."""

    volume_id: str
    kind: ExportKind
    path: str  # /dev/loopN, a socket, an nbd+unix URI or a FUSE file
    size: int
    serial: str
    major: int | None = None
    minor: int | None = None
    socket: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "volume_id": self.volume_id, "kind": self.kind.value, "path": self.path,
            "size": self.size, "serial": self.serial, "major": self.major,
            "minor": self.minor, "socket": self.socket,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Device:
        def opt_int(key: str) -> int | None:
            value = data.get(key)
            return int(value) if isinstance(value, int) else None

        socket = data.get("socket")
        return cls(
            volume_id=str(data["volume_id"]), kind=ExportKind(data["kind"]),
            path=str(data["path"]), size=int(str(data["size"])), serial=str(data["serial"]),
            major=opt_int("major"), minor=opt_int("minor"),
            socket=str(socket) if socket is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Volume:
    """A writable copy-on-write clone of a base."""

    id: str
    base_id: str
    path: Path
    size: int
    serial: str
    state: State = State.READY
    device: Device | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    bases: tuple[Base, ...]
    volumes: tuple[Volume, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    """Pool space: ``capacity`` and ``used`` bytes as the backend accounts them."""

    capacity: int
    used: int
    bases: int
    volumes: int
    exported: int

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)
