"""On-disk state of a pool: one JSON record per base and per volume, and per-id locks.

Records are replaced atomically (write a temporary file, ``rename`` over the old one), so after
a crash every record is either the old or the new version. Locks are ``flock(2)`` locks on a
fixed set of striped lock files: they serialise threads and processes alike, and the kernel
drops them when a process dies, which is how recovery tells a crashed operation from a running
one. Volume locks are always taken before base locks.

Two layers: the raw JSON of a record (:meth:`Store.read`/:meth:`Store.write`, the on-disk
format) and its typed record (:meth:`Store.base`, :meth:`Store.volume`, :meth:`Store.put`,
see :mod:`kata_ipu.block.records`), which is what the block engine works with.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kata_ipu.block.records import BaseRecord, Kind, Record, VolumeRecord

__all__ = ["STRIPES", "Kind", "Store"]

STRIPES = 64


class Store:
    """Records under ``<dir>/{bases,volumes}/<id>.json`` and lock files under ``<dir>/locks``."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.dir = directory
        self.durable = durable
        self._tmp_seq = 0
        self._tmp_lock = threading.Lock()

    def create(self) -> None:
        for sub in (Kind.BASES, Kind.VOLUMES, "locks", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    # -- records -------------------------------------------------------------------------

    def _path(self, kind: Kind, object_id: str) -> Path:
        return self.dir / kind / f"{object_id}.json"

    def read(self, kind: Kind, object_id: str) -> dict[str, Any] | None:
        try:
            data = self._path(kind, object_id).read_bytes()
        except FileNotFoundError:
            return None
        record: dict[str, Any] = json.loads(data)
        return record

    def write(self, kind: Kind, object_id: str, record: dict[str, Any]) -> None:
        with self._tmp_lock:
            self._tmp_seq += 1
            seq = self._tmp_seq
        tmp = self.dir / "tmp" / f"{object_id}.{os.getpid()}.{seq}"
        data = json.dumps(record, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            if self.durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._path(kind, object_id))

    def delete(self, kind: Kind, object_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(kind, object_id).unlink()

    def ids(self, kind: Kind) -> list[str]:
        try:
            names = os.listdir(self.dir / kind)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json"))

    def all(self, kind: Kind) -> list[dict[str, Any]]:
        out = []
        for object_id in self.ids(kind):
            record = self.read(kind, object_id)
            if record is not None:
                out.append(record)
        return out

    # -- typed records -------------------------------------------------------------------

    def base(self, base_id: str) -> BaseRecord | None:
        data = self.read(Kind.BASES, base_id)
        return BaseRecord.from_json(data) if data is not None else None

    def volume(self, volume_id: str) -> VolumeRecord | None:
        data = self.read(Kind.VOLUMES, volume_id)
        return VolumeRecord.from_json(data) if data is not None else None

    def current(self, record: Record) -> Record | None:
        """The record of the same kind and id as ``record`` that is on disk now."""
        return self.base(record.id) if record.kind is Kind.BASES else self.volume(record.id)

    def bases(self) -> list[BaseRecord]:
        return [BaseRecord.from_json(r) for r in self.all(Kind.BASES)]

    def volumes(self) -> list[VolumeRecord]:
        return [VolumeRecord.from_json(r) for r in self.all(Kind.VOLUMES)]

    def put(self, record: Record) -> None:
        self.write(record.kind, record.id, record.to_json())

    def clean_tmp(self) -> None:
        """Remove temporary files left by crashed writers (call with no writer running)."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir / "tmp"):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / "tmp" / name).unlink()

    # -- locks ---------------------------------------------------------------------------

    def _lock_path(self, kind: Kind, object_id: str) -> Path:
        stripe = int.from_bytes(hashlib.sha256(object_id.encode()).digest()[:4], "big")
        return self.dir / "locks" / f"{Kind(kind).value[0]}{stripe % STRIPES:02d}"

    @contextlib.contextmanager
    def lock(self, kind: Kind, object_id: str, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the lock of ``object_id``; yields False if ``blocking`` is off and it is taken."""
        fd = os.open(self._lock_path(kind, object_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing the last descriptor releases the flock
