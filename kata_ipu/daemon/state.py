"""The daemon's durable state: SQLite in WAL mode, one writer.

Lifecycle of the rows (the daemon's source of truth for *intent*; recovery compares it with
what really exists — pool files, loop devices, qemu-storage-daemon nodes)::

    image   pulled manifest (digest) + the names that point at it
    base    (of one image's first ``layers`` layers; 0: all of them)
            BUILDING ──build ok──▶ READY ──remove──▶ (deleted)
               └──────crash / error──▶ (deleted by recovery, with its partial file)
    volume  CREATING ──clone+export ok──▶ READY ──Release──▶ RELEASING ──▶ (deleted)
    lease   a named hold on a blob digest or base id (GC skips anything leased)

All access goes through one dedicated thread (:class:`StateStore` owns the connection), so
writes are serialized without locks and the event loop never blocks on SQLite. Every public
method is one transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kata_ipu.block.model import Device, ExportKind
from kata_ipu.errors import Internal

T = TypeVar("T")

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY,
    config_digest TEXT NOT NULL,
    platform TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS bases (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    fstype TEXT NOT NULL,
    state TEXT NOT NULL,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    built_at REAL NOT NULL DEFAULT 0,
    build_seconds REAL NOT NULL DEFAULT 0,
    layers INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS volumes (
    container_id TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL UNIQUE,
    base_id TEXT NOT NULL,
    image TEXT NOT NULL,
    digest TEXT NOT NULL,
    state TEXT NOT NULL,
    export_kind TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT '{}',
    annotations TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT NOT NULL,
    target TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (id, target)
);
CREATE INDEX IF NOT EXISTS volumes_by_base ON volumes(base_id);
"""

# Each step takes the schema from version N (its index + 1) to N + 1; CREATE TABLE IF NOT
# EXISTS above does not change tables that already exist.
_MIGRATIONS = (
    # 1 -> 2: bases of an image's first N layers (a containerd chain below the image's top)
    "ALTER TABLE bases ADD COLUMN layers INTEGER NOT NULL DEFAULT 0",
)


class BaseState(enum.StrEnum):
    BUILDING = "building"
    READY = "ready"


class VolumeState(enum.StrEnum):
    CREATING = "creating"
    READY = "ready"
    RELEASING = "releasing"


@dataclass(frozen=True)
class ImageRecord:
    digest: str
    config_digest: str
    platform: str
    size_bytes: int
    created_at: float
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class BaseRecord:
    id: str
    digest: str
    fstype: str
    state: BaseState
    size_bytes: int = 0
    built_at: float = 0.0
    build_seconds: float = 0.0
    layers: int = 0  # the image's first N layers only; 0: all of them


@dataclass(frozen=True)
class VolumeRecord:
    container_id: str
    volume_id: str
    base_id: str
    image: str
    digest: str
    state: VolumeState
    export_kind: ExportKind  # stored by name (``HOST_BLOCK``)
    device: Device | None = None  # stored as :meth:`Device.to_json`, ``{}`` for none
    annotations: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class PrepareView:
    """The records ``Prepare`` decides on (:meth:`StateStore.prepare_view`)."""

    volume: VolumeRecord | None
    image: ImageRecord | None
    base: BaseRecord | None  # of ``image``; None without an image


class StateStore:
    """Owns the SQLite connection on a private thread. Open with :meth:`open`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kata-ipu-state")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> StateStore:
        store = cls(path)
        await store._call(store._open)
        return store

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise Internal(f"{self.path}: state schema {version} is newer than this daemon "
                           f"({SCHEMA_VERSION}); refusing to touch it")
        if version:
            for step in _MIGRATIONS[version - 1:]:
                db.execute(step)
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[], T]:
        def run() -> T:
            db = self._db
            if db is None:
                raise Internal("state store is closed")
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        return run

    # ----------------------------------------------------------------- images
    async def put_image(self, record: ImageRecord, name: str | None) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO images(digest, config_digest, platform, size_bytes, created_at) "
                "VALUES (?,?,?,?,?) ON CONFLICT(digest) DO NOTHING",
                (record.digest, record.config_digest, record.platform, record.size_bytes,
                 record.created_at))
            if name:
                db.execute("INSERT INTO image_names(name, digest) VALUES (?,?) "
                           "ON CONFLICT(name) DO UPDATE SET digest=excluded.digest",
                           (name, record.digest))
        await self._call(self._tx(tx))

    async def get_image(self, name_or_digest: str) -> ImageRecord | None:
        return await self._call(self._tx(lambda db: _named_image(db, name_or_digest)))

    async def list_images(self) -> list[ImageRecord]:
        def tx(db: sqlite3.Connection) -> list[ImageRecord]:
            digests = [r[0] for r in db.execute("SELECT digest FROM images ORDER BY created_at")]
            return [img for d in digests if (img := _image(db, d)) is not None]
        return await self._call(self._tx(tx))

    async def delete_image(self, digest: str) -> None:
        await self._call(self._tx(lambda db: db.execute(
            "DELETE FROM images WHERE digest=?", (digest,)) and None))

    # ----------------------------------------------------------------- bases
    async def put_base(self, record: BaseRecord) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO bases(id, digest, fstype, state, size_bytes, built_at, "
                "build_seconds, layers) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE "
                "SET state=excluded.state, size_bytes=excluded.size_bytes, "
                "built_at=excluded.built_at, build_seconds=excluded.build_seconds",
                (record.id, record.digest, record.fstype, record.state.value,
                 record.size_bytes, record.built_at, record.build_seconds, record.layers))
        await self._call(self._tx(tx))

    async def get_base(self, base_id: str) -> BaseRecord | None:
        return await self._call(self._tx(lambda db: _base_by_id(db, base_id)))

    async def list_bases(self, digest: str | None = None) -> list[BaseRecord]:
        def tx(db: sqlite3.Connection) -> list[BaseRecord]:
            if digest is None:
                rows: Iterable[tuple[Any, ...]] = db.execute(
                    f"SELECT {_BASE_COLS} FROM bases ORDER BY id")
            else:
                rows = db.execute(f"SELECT {_BASE_COLS} FROM bases WHERE digest=? ORDER BY id",
                                  (digest,))
            return [_base(r) for r in rows]
        return await self._call(self._tx(tx))

    async def delete_base(self, base_id: str) -> None:
        await self._call(self._tx(lambda db: db.execute(
            "DELETE FROM bases WHERE id=?", (base_id,)) and None))

    # ----------------------------------------------------------------- volumes
    async def put_volume(self, record: VolumeRecord) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO volumes(container_id, volume_id, base_id, image, digest, state, "
                "export_kind, device, annotations, created_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(container_id) DO UPDATE SET state=excluded.state, "
                "device=excluded.device, export_kind=excluded.export_kind",
                (record.container_id, record.volume_id, record.base_id, record.image,
                 record.digest, record.state.value, record.export_kind.name,
                 json.dumps(record.device.to_json() if record.device else {}, sort_keys=True),
                 json.dumps(record.annotations, sort_keys=True), record.created_at))
        await self._call(self._tx(tx))

    async def get_volume(self, container_id: str) -> VolumeRecord | None:
        return await self._call(self._tx(lambda db: _volume_of(db, container_id)))

    async def prepare_view(self, container_id: str, image: str,
                           base_id_of: Callable[[str], str]) -> PrepareView:
        """What ``Prepare`` looks up before it decides, in one transaction (one trip to the
        store's thread, on every container's start path): the container's volume, the image
        by name or digest, and the base ``base_id_of(image digest)`` names."""
        def tx(db: sqlite3.Connection) -> PrepareView:
            img = _named_image(db, image)
            base = _base_by_id(db, base_id_of(img.digest)) if img is not None else None
            return PrepareView(_volume_of(db, container_id), img, base)
        return await self._call(self._tx(tx))

    async def list_volumes(self, base_id: str | None = None) -> list[VolumeRecord]:
        def tx(db: sqlite3.Connection) -> list[VolumeRecord]:
            if base_id is None:
                rows: Iterable[tuple[Any, ...]] = db.execute(
                    f"SELECT {_VOL_COLS} FROM volumes ORDER BY created_at")
            else:
                rows = db.execute(
                    f"SELECT {_VOL_COLS} FROM volumes WHERE base_id=? ORDER BY created_at",
                    (base_id,))
            return [_volume(r) for r in rows]
        return await self._call(self._tx(tx))

    async def delete_volume(self, container_id: str) -> None:
        await self._call(self._tx(lambda db: db.execute(
            "DELETE FROM volumes WHERE container_id=?", (container_id,)) and None))

    # ----------------------------------------------------------------- leases
    async def add_lease(self, lease_id: str, target: str) -> None:
        await self._call(self._tx(lambda db: db.execute(
            "INSERT INTO leases(id, target, created_at) VALUES (?,?,?) "
            "ON CONFLICT(id, target) DO NOTHING", (lease_id, target, time.time())) and None))

    async def remove_lease(self, lease_id: str, target: str | None = None) -> None:
        def tx(db: sqlite3.Connection) -> None:
            if target is None:
                db.execute("DELETE FROM leases WHERE id=?", (lease_id,))
            else:
                db.execute("DELETE FROM leases WHERE id=? AND target=?", (lease_id, target))
        await self._call(self._tx(tx))

    async def leased_targets(self) -> set[str]:
        return await self._call(self._tx(lambda db: {
            r[0] for r in db.execute("SELECT DISTINCT target FROM leases")}))


_BASE_COLS = "id, digest, fstype, state, size_bytes, built_at, build_seconds, layers"
_VOL_COLS = ("container_id, volume_id, base_id, image, digest, state, export_kind, device, "
             "annotations, created_at")


def _named_image(db: sqlite3.Connection, name_or_digest: str) -> ImageRecord | None:
    row = db.execute("SELECT digest FROM image_names WHERE name=?",
                     (name_or_digest,)).fetchone()
    return _image(db, row[0] if row else name_or_digest)


def _base_by_id(db: sqlite3.Connection, base_id: str) -> BaseRecord | None:
    row = db.execute(f"SELECT {_BASE_COLS} FROM bases WHERE id=?", (base_id,)).fetchone()
    return _base(row) if row else None


def _volume_of(db: sqlite3.Connection, container_id: str) -> VolumeRecord | None:
    row = db.execute(f"SELECT {_VOL_COLS} FROM volumes WHERE container_id=?",
                     (container_id,)).fetchone()
    return _volume(row) if row else None


def _image(db: sqlite3.Connection, digest: str) -> ImageRecord | None:
    row = db.execute("SELECT digest, config_digest, platform, size_bytes, created_at "
                     "FROM images WHERE digest=?", (digest,)).fetchone()
    if row is None:
        return None
    names = tuple(r[0] for r in db.execute(
        "SELECT name FROM image_names WHERE digest=? ORDER BY name", (digest,)))
    return ImageRecord(row[0], row[1], row[2], row[3], row[4], names)


def _base(row: tuple[Any, ...]) -> BaseRecord:
    return BaseRecord(str(row[0]), str(row[1]), str(row[2]), BaseState(str(row[3])),
                      int(row[4]), float(row[5]), float(row[6]), int(row[7]))


def _volume(row: tuple[Any, ...]) -> VolumeRecord:
    device = json.loads(str(row[7]))
    return VolumeRecord(
        str(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]),
        VolumeState(str(row[5])), ExportKind[str(row[6])],
        Device.from_json(device) if device else None, json.loads(str(row[8])), float(row[9]),
    )
