"""Leases: named holds on content that garbage collection must keep.

A lease is a JSON file ``leases/<id>.json`` listing descriptors (usually one manifest, whose
config and layers are then kept too). The rootfs builder takes one per base block image
(``base:<manifest digest>``) and releases it when the base is deleted; a pull takes a
*temporary* lease (with its pid) for the blobs it commits before the image is tagged.

Lifecycle: ``create`` (or ``add`` to an existing lease) → content is protected → ``delete``.
Temporary leases whose process is gone are ignored by GC and removed by :meth:`prune`.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kata_ipu.content.errors import InvalidLayout
from kata_ipu.errors import InvalidArgument, NotFound
from kata_ipu.oci.manifest import Descriptor, parse_descriptor
from kata_ipu.osutil.atomicfile import write_atomic

_LEASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,200}$")


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    resources: tuple[Descriptor, ...]
    created: float
    labels: Mapping[str, str] = field(default_factory=dict)
    pid: int | None = None
    """Set for temporary leases: the lease dies with this process."""

    @property
    def alive(self) -> bool:
        if self.pid is None:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class LeaseManager:
    """Leases of one content store (``<root>/leases``)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "leases"

    def _path(self, lease_id: str) -> Path:
        if not _LEASE_ID.match(lease_id):
            raise InvalidArgument(f"invalid lease id {lease_id!r}")
        return self.dir / f"{lease_id.replace(':', '_')}.json"

    def _write(self, lease: Lease) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(lease.id)
        data = {
            "id": lease.id,
            "created": lease.created,
            "labels": dict(lease.labels),
            "pid": lease.pid,
            "resources": [d.to_json() for d in lease.resources],
        }
        write_atomic(path, json.dumps(data, sort_keys=True).encode())

    def create(self, lease_id: str, resources: Iterable[Descriptor] = (), *,
               labels: Mapping[str, str] | None = None, temporary: bool = False) -> Lease:
        """Create (or replace) a lease holding ``resources``."""
        lease = Lease(lease_id, tuple(resources), time.time(), dict(labels or {}),
                      os.getpid() if temporary else None)
        self._write(lease)
        return lease

    def add(self, lease_id: str, *resources: Descriptor) -> Lease:
        lease = self.get(lease_id)
        known = {d.digest for d in lease.resources}
        new = tuple(d for d in resources if d.digest not in known)
        lease = Lease(lease.id, lease.resources + new, lease.created, lease.labels, lease.pid)
        self._write(lease)
        return lease

    def get(self, lease_id: str) -> Lease:
        path = self._path(lease_id)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise NotFound(f"no lease {lease_id!r}") from exc
        except ValueError as exc:
            raise InvalidLayout(f"corrupt lease file {path}") from exc
        return Lease(
            id=raw["id"],
            resources=tuple(parse_descriptor(d, f"lease {lease_id}") for d in raw["resources"]),
            created=float(raw["created"]),
            labels=dict(raw.get("labels") or {}),
            pid=raw.get("pid"),
        )

    def list(self) -> builtins.list[Lease]:
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                raw_id = json.loads(path.read_text())["id"]
                out.append(self.get(raw_id))
            except (FileNotFoundError, NotFound):
                continue
        return out

    def delete(self, lease_id: str) -> None:
        """Remove a lease (idempotent)."""
        try:
            self._path(lease_id).unlink()
        except FileNotFoundError:
            pass

    def prune(self) -> builtins.list[str]:
        """Delete temporary leases whose process is gone; returns their ids."""
        dead = [lease.id for lease in self.list() if not lease.alive]
        for lease_id in dead:
            self.delete(lease_id)
        return dead
