"""The ipu snapshotter's metadata: SQLite in WAL mode (``<root>/metadata.db``).

Rows and their lifecycle::

    snapshot  ACTIVE/VIEW (key) ──Commit──▶ COMMITTED (name)          same id, same dirs
              COMMITTED, remote: (repo@M, first k of n layers)        no dirs on the host
              ──Remove (no children)──▶ (deleted; its dirs are removed after the row)
    lower     MOUNTING ──IPU clone exported + mounted──▶ MOUNTED
              MOUNTED ──no active/view snapshot stacks on it──▶ RELEASING ──▶ (deleted)

A snapshot's ``id`` names its directories (``snapshots/<id>/fs`` and ``work``) and never
changes; ``parent`` is the parent's name. Every public method is one transaction, safe to
call from any thread (one connection behind a lock: snapshotter calls are short).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kata_ipu.errors import AlreadyExists, Internal
from shim_hooks.snapshotter.model import Kind, RemoteImage, Snapshot

T = TypeVar("T")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    parent TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    depth INTEGER NOT NULL,
    remote_ref TEXT,
    remote_manifest TEXT,
    remote_layers INTEGER,
    remote_total INTEGER,
    lower INTEGER,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent);
CREATE INDEX IF NOT EXISTS snapshots_by_lower ON snapshots(lower);
CREATE TABLE IF NOT EXISTS lowers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest TEXT NOT NULL,
    layers INTEGER NOT NULL,
    total INTEGER NOT NULL,
    reference TEXT NOT NULL,
    volume TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT '',
    fstype TEXT NOT NULL DEFAULT '',
    options TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    UNIQUE (manifest, layers)
);
"""

_SNAP_COLS = ("id, name, kind, parent, labels, created, updated, depth, remote_ref, "
              "remote_manifest, remote_layers, remote_total, lower, size, inodes")
_LOWER_COLS = "id, manifest, layers, total, reference, volume, state, device, fstype, options"


class LowerNotReady(Exception):
    """The lower is not MOUNTED (new, or being released): take the slow path, which waits."""


@dataclass(frozen=True, slots=True)
class Lower:
    """The IPU's clone of one base, exported to the host and mounted read-only."""

    id: int
    image: RemoteImage
    volume: str  # the IPU's container id for the clone (RootfsService key)
    state: str  # "mounting", "mounted", "releasing"
    device: str = ""
    fstype: str = ""
    options: tuple[str, ...] = ()


def _snapshot(row: tuple[Any, ...]) -> Snapshot:
    remote = (RemoteImage(row[8], row[9], int(row[10]), int(row[11]))
              if row[8] is not None else None)
    return Snapshot(int(row[0]), str(row[1]), Kind(int(row[2])), str(row[3]),
                    json.loads(row[4]), float(row[5]), float(row[6]), int(row[7]), remote,
                    None if row[12] is None else int(row[12]), int(row[13]), int(row[14]))


def _lower(row: tuple[Any, ...]) -> Lower:
    return Lower(int(row[0]), RemoteImage(str(row[4]), str(row[1]), int(row[2]), int(row[3])),
                 str(row[5]), str(row[6]), str(row[7]), str(row[8]),
                 tuple(json.loads(row[9])))


def _find_lower(db: sqlite3.Connection, image: RemoteImage) -> Lower | None:
    row = db.execute(f"SELECT {_LOWER_COLS} FROM lowers WHERE manifest=? AND layers=?",
                     (image.manifest, image.layers)).fetchone()
    return _lower(row) if row else None


class MetaStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            db.close()
            raise Internal(f"{path}: metadata schema {version} is newer than this snapshotter "
                           f"({SCHEMA_VERSION}); refusing to touch it")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One consistent read (autocommit SELECTs in WAL mode take no write lock)."""
        with self._lock:
            return fn(self._db)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    # ------------------------------------------------------------------ snapshots
    def get(self, name: str) -> Snapshot | None:
        def tx(db: sqlite3.Connection) -> Snapshot | None:
            row = db.execute(f"SELECT {_SNAP_COLS} FROM snapshots WHERE name=?",
                             (name,)).fetchone()
            return _snapshot(row) if row else None
        return self._read(tx)

    def children(self, name: str) -> int:
        return self._read(lambda db: int(db.execute(
            "SELECT COUNT(*) FROM snapshots WHERE parent=?", (name,)).fetchone()[0]))

    def create(self, kind: Kind, name: str, parent: str, labels: dict[str, str], depth: int,
               *, remote: RemoteImage | None = None, lower: int | None = None,
               lower_mounted: bool = False) -> Snapshot:
        """``lower_mounted``: only if the lower is MOUNTED (else :class:`LowerNotReady`), in
        the same transaction — a release claims it in one too (:meth:`claim_release`)."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> Snapshot:
            if db.execute("SELECT 1 FROM snapshots WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {name!r} already exists")
            if lower_mounted and db.execute("SELECT state FROM lowers WHERE id=?",
                                            (lower,)).fetchone() != ("mounted",):
                raise LowerNotReady(lower)
            cur = db.execute(
                "INSERT INTO snapshots(name, kind, parent, labels, created, updated, depth, "
                "remote_ref, remote_manifest, remote_layers, remote_total, lower) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, int(kind), parent, json.dumps(labels, sort_keys=True), now, now, depth,
                 remote.reference if remote else None, remote.manifest if remote else None,
                 remote.layers if remote else None, remote.total if remote else None, lower))
            return Snapshot(int(cur.lastrowid or 0), name, kind, parent, dict(labels), now,
                            now, depth, remote, lower)
        return self._tx(tx)

    def commit(self, key: str, name: str, labels: dict[str, str], size: int,
               inodes: int) -> Snapshot:
        """Active ``key`` becomes committed ``name`` (the caller checked it is active)."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> Snapshot:
            if db.execute("SELECT 1 FROM snapshots WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {name!r} already exists")
            # created anew, labels replaced, not inherited (containerd's CommitActive)
            db.execute("UPDATE snapshots SET name=?, kind=?, labels=?, created=?, updated=?, "
                       "lower=NULL, size=?, inodes=? WHERE name=?",
                       (name, int(Kind.COMMITTED), json.dumps(labels, sort_keys=True), now, now,
                        size, inodes, key))
            row = db.execute(f"SELECT {_SNAP_COLS} FROM snapshots WHERE name=?",
                             (name,)).fetchone()
            return _snapshot(row)
        return self._tx(tx)

    def delete(self, name: str) -> None:
        self._tx(lambda db: db.execute("DELETE FROM snapshots WHERE name=?", (name,)))

    def set_labels(self, name: str, labels: dict[str, str]) -> Snapshot:
        def tx(db: sqlite3.Connection) -> Snapshot:
            db.execute("UPDATE snapshots SET labels=?, updated=? WHERE name=?",
                       (json.dumps(labels, sort_keys=True), time.time(), name))
            row = db.execute(f"SELECT {_SNAP_COLS} FROM snapshots WHERE name=?",
                             (name,)).fetchone()
            return _snapshot(row)
        return self._tx(tx)

    def all(self) -> list[Snapshot]:
        return self._read(lambda db: [_snapshot(r) for r in db.execute(
            f"SELECT {_SNAP_COLS} FROM snapshots ORDER BY id")])

    def find_remote(self, target: str, parent: str) -> Snapshot | None:
        """The committed remote snapshot of chain ``target`` on ``parent``, if any."""
        for snap in self.all_remote():
            if snap.parent == parent and snap.labels.get("containerd.io/snapshot.ref") == target:
                return snap
        return None

    def all_remote(self) -> list[Snapshot]:
        return self._read(lambda db: [_snapshot(r) for r in db.execute(
            f"SELECT {_SNAP_COLS} FROM snapshots WHERE remote_ref IS NOT NULL ORDER BY id")])

    def remote_uses(self, manifest: str) -> int:
        """Remote snapshots holding layers of image ``manifest``."""
        return self._read(lambda db: int(db.execute(
            "SELECT COUNT(*) FROM snapshots WHERE remote_manifest=?",
            (manifest,)).fetchone()[0]))

    # ------------------------------------------------------------------ lowers
    def find_lower(self, image: RemoteImage) -> Lower | None:
        return self._read(lambda db: _find_lower(db, image))

    def lower_for(self, image: RemoteImage, volume: str) -> Lower:
        """The lower of (image, its first k layers), recorded as MOUNTING if new."""
        found = self.find_lower(image)
        if found is not None:
            return found

        def tx(db: sqlite3.Connection) -> Lower:
            again = _find_lower(db, image)
            if again is not None:
                return again
            cur = db.execute(
                "INSERT INTO lowers(manifest, layers, total, reference, volume, state, "
                "created) VALUES (?,?,?,?,?,?,?)",
                (image.manifest, image.layers, image.total, image.reference, volume,
                 "mounting", time.time()))
            return Lower(int(cur.lastrowid or 0), image, volume, "mounting")
        return self._tx(tx)

    def get_lower(self, lower_id: int) -> Lower | None:
        def tx(db: sqlite3.Connection) -> Lower | None:
            row = db.execute(f"SELECT {_LOWER_COLS} FROM lowers WHERE id=?",
                             (lower_id,)).fetchone()
            return _lower(row) if row else None
        return self._read(tx)

    def lowers(self) -> list[Lower]:
        return self._read(lambda db: [_lower(r) for r in db.execute(
            f"SELECT {_LOWER_COLS} FROM lowers ORDER BY id")])

    def set_lower(self, lower_id: int, state: str, device: str = "", fstype: str = "",
                  options: tuple[str, ...] = ()) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE lowers SET state=?, device=?, fstype=?, options=? WHERE id=?",
            (state, device, fstype, json.dumps(list(options)), lower_id)))

    def delete_lower(self, lower_id: int) -> None:
        self._tx(lambda db: db.execute("DELETE FROM lowers WHERE id=?", (lower_id,)))

    def claim_release(self, lower_id: int) -> Lower | None:
        """The lower, now RELEASING, if no snapshot stacks on it (checked and set in one
        transaction, so no snapshot can be created on it in between); else None."""
        def tx(db: sqlite3.Connection) -> Lower | None:
            if db.execute("SELECT 1 FROM snapshots WHERE lower=? LIMIT 1",
                          (lower_id,)).fetchone():
                return None
            row = db.execute(f"SELECT {_LOWER_COLS} FROM lowers WHERE id=?",
                             (lower_id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE lowers SET state='releasing' WHERE id=?", (lower_id,))
            return _lower(row)
        return self._tx(tx)

    def lower_users(self, lower_id: int) -> int:
        """Active and view snapshots whose mounts stack on the lower."""
        return self._read(lambda db: int(db.execute(
            "SELECT COUNT(*) FROM snapshots WHERE lower=?", (lower_id,)).fetchone()[0]))
