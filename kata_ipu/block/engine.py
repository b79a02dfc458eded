"""The backend-independent half of a block target: ids, per-id locks, the record state
machine, crash recovery and space checks. Backends fill in the data-path hooks.

State machine of a volume record (the same shape for bases, without ``EXPORTED``)::

    (none) ──clone──▶ CREATING ──data cloned──▶ READY ◀──unexport── EXPORTED
                          │                       │ └──export──────────▲
                          ▼ crash                 ▼ destroy
                      recovery rolls back     DESTROYING ──file gone──▶ (none)

Every mutation happens under the id's lock, the intent record is written before the data
changes, and recovery only touches records whose lock it can take (a live operation holds it).

Why one module of ~490 lines: it is one state machine. Every public method is "take the
id's lock, read the record, check the transition, write the intent, change the data, commit",
and recovery is the same steps run backwards; splitting the methods across modules would
split the lock discipline (volume locks before base locks) that makes them safe together.
The typed records are in :mod:`.records`, their storage in :mod:`.store`, the data paths in
the backends.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from kata_ipu.block import fsutil, loop
from kata_ipu.block.errors import (
    BadImage,
    BaseExists,
    BaseInUse,
    BaseNotFound,
    ExportNotSupported,
    NeedsIpu,
    PoolFull,
    VolumeBusy,
    VolumeExists,
    VolumeNotFound,
)
from kata_ipu.block.interface import BlockTarget
from kata_ipu.block.model import (
    Base,
    Device,
    ExportKind,
    Listing,
    Pool,
    State,
    Usage,
    Volume,
    check_id,
    check_transition,
    serial_for,
)
from kata_ipu.block.records import BaseRecord, Kind, Record, VolumeRecord
from kata_ipu.block.store import Store
from kata_ipu.errors import FailedPrecondition
from kata_ipu.executor import DEFAULT, Executor
from kata_ipu.osutil import mountinfo

log = logging.getLogger("kata_ipu.block")

BASES, VOLUMES = Kind.BASES, Kind.VOLUMES


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _is_enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class StoreTarget(BlockTarget):
    """Generic implementation over a :class:`Store`; subclasses implement the ``_data_*``
    hooks for their data path."""

    volume_suffix: ClassVar[str] = ".img"
    clone_reserve: ClassVar[int] = 1 << 20  # free space demanded before a clone

    def __init__(self, pool: Pool, run_dir: Path, executor: Executor = DEFAULT) -> None:
        self._pool = pool
        self.run_dir = run_dir
        self.executor = executor
        self.store = Store(pool.data_dir / "meta")
        self.bases_dir = pool.data_dir / "bases"
        self.volumes_dir = pool.data_dir / "volumes"

    @property
    def pool(self) -> Pool:
        return self._pool

    def _prepare_dirs(self) -> None:
        self.store.create()
        self.bases_dir.mkdir(exist_ok=True)
        self.volumes_dir.mkdir(exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- data-path hooks ---------------------------------------------------------------------

    def base_path(self, base_id: str) -> Path:
        return self.bases_dir / f"{base_id}.img"

    def volume_path(self, volume_id: str) -> Path:
        return self.volumes_dir / f"{volume_id}{self.volume_suffix}"

    @abc.abstractmethod
    def _data_clone(self, base: Base, dst: Path) -> None:
        """Create ``dst`` as a copy-on-write clone of ``base`` (must not exist yet)."""

    @abc.abstractmethod
    def _data_export(self, volume: Volume, base: Base, kind: ExportKind) -> Device:
        """Create the export; must clean up after itself if it fails."""

    @abc.abstractmethod
    def _data_unexport(self, volume: Volume, device: Device) -> None:
        """Remove the export; tolerant of pieces already gone."""

    @abc.abstractmethod
    def _data_alive(self, volume: Volume, device: Device) -> bool:
        """Whether a recorded export is still served."""

    @abc.abstractmethod
    def _space(self) -> tuple[int, int, int]:
        """(capacity, used, available) bytes of the pool."""

    def _base_added(self, base: Base) -> None:
        """Called under the base lock once a base is READY."""

    def _base_removing(self, base: Base) -> None:
        """Called under the base lock before a base's file is removed."""

    def _crash_point(self, stage: str, volume_id: str) -> None:
        """Called between a data change and the record that commits it (``stage`` is
        ``"clone"`` or ``"export"``): the crash tests kill their worker process here."""

    # -- records <-> objects -----------------------------------------------------------------

    def _write(self, record: Record) -> None:
        """Write a record after checking its state change against :data:`TRANSITIONS`."""
        current = self.store.current(record)
        check_transition(record.kind.singular, record.id,
                         current.state if current else None, record.state)
        self.store.put(record)

    def _base_of(self, rec: BaseRecord) -> Base:
        return Base(id=rec.id, path=self.base_path(rec.id), size=rec.size,
                    digest=rec.digest, state=rec.state)

    def _volume_of(self, rec: VolumeRecord) -> Volume:
        return Volume(id=rec.id, base_id=rec.base, path=self.volume_path(rec.id),
                      size=rec.size, serial=serial_for(rec.id), state=rec.state,
                      device=rec.export)

    @staticmethod
    def _vid(volume: Volume | str) -> str:
        return check_id("volume", volume.id if isinstance(volume, Volume) else volume)

    # -- bases -------------------------------------------------------------------------------

    def import_base(self, image: str | os.PathLike[str], base_id: str, *,
                    content_id: str | None = None) -> Base:
        check_id("base", base_id)
        src = Path(image)
        try:
            st = src.stat()
        except OSError as exc:
            raise BadImage(src, "cannot stat the image") from exc
        if not src.is_file() or st.st_size == 0 or st.st_size % 512:
            raise BadImage(src, "not a regular, non-empty file of whole 512-byte sectors")
        # Hashing costs a full read of the image (~0.15 s per 150 MiB); a caller that knows
        # what the image was made from names it instead.
        digest = content_id if content_id is not None else _hash_file(src)
        with self.store.lock(BASES, base_id):
            rec = self.store.base(base_id)
            if rec is not None and rec.state is State.READY:
                if rec.digest != digest or rec.size != st.st_size:
                    raise BaseExists(base_id, f"with different content ({rec.digest})")
                return self._base_of(rec)
            if rec is not None:
                self._rollback_base(base_id, rec)
            need = fsutil.allocated_bytes(src)
            _capacity, _used, free = self._space()
            if need + self.clone_reserve > free:
                raise PoolFull(need + self.clone_reserve, free)
            dst = self.base_path(base_id)
            record = BaseRecord(base_id, State.CREATING, st.st_size, digest, time.time())
            self._write(record)
            try:
                fsutil.sparse_copy(src, dst)
                os.chmod(dst, 0o444)
                fsutil.set_immutable(dst, True)
            except BaseException as exc:
                fsutil.unlink_quiet(dst)
                self.store.delete(BASES, base_id)
                if _is_enospc(exc):
                    raise PoolFull(need, self._space()[2]) from exc
                raise
            record = dataclasses.replace(record, state=State.READY)
            base = self._base_of(record)
            self._base_added(base)
            self._write(record)
            log.info("base imported", extra={"base": base_id, "size": st.st_size,
                                             "backend": self.backend})
            return base

    def get_base(self, base_id: str) -> Base:
        check_id("base", base_id)
        rec = self.store.base(base_id)
        if rec is None or rec.state is not State.READY:
            raise BaseNotFound(base_id)
        return self._base_of(rec)

    def destroy_base(self, base_id: str) -> None:
        check_id("base", base_id)
        with self.store.lock(BASES, base_id):
            rec = self.store.base(base_id)
            if rec is None:
                raise BaseNotFound(base_id)
            clones = [v.id for v in self.store.volumes() if v.base == base_id
                      and v.state is not State.DESTROYING]
            if clones:
                raise BaseInUse(base_id, clones)
            self._rollback_base(base_id, rec)
            log.info("base destroyed", extra={"base": base_id, "backend": self.backend})

    def _rollback_base(self, base_id: str, rec: BaseRecord) -> None:
        rec = dataclasses.replace(rec, state=State.DESTROYING)
        self._write(rec)
        self._base_removing(self._base_of(rec))
        fsutil.unlink_quiet(self.base_path(base_id))
        self.store.delete(BASES, base_id)

    # -- volumes -----------------------------------------------------------------------------

    def clone(self, base: Base | str, volume_id: str) -> Volume:
        base_id = check_id("base", base.id if isinstance(base, Base) else base)
        check_id("volume", volume_id)
        with self.store.lock(VOLUMES, volume_id):
            rec = self.store.volume(volume_id)
            if rec is not None and rec.listed:
                if rec.base != base_id:
                    raise VolumeExists(volume_id, rec.base)
                return self._volume_of(rec)
            if rec is not None:
                self._rollback_volume(volume_id, rec)
            with self.store.lock(BASES, base_id):
                record = self._clone_locked(base_id, volume_id)
        return self._volume_of(record)

    def _clone_locked(self, base_id: str, volume_id: str) -> VolumeRecord:
        """The clone itself, under the volume's and the base's locks."""
        brec = self.store.base(base_id)
        if brec is None or brec.state is not State.READY:
            raise BaseNotFound(base_id)
        b = self._base_of(brec)
        free = self._space()[2]
        if free < self.clone_reserve:
            raise PoolFull(self.clone_reserve, free)
        record = VolumeRecord(volume_id, base_id, State.CREATING, b.size)
        self._write(record)
        dst = self.volume_path(volume_id)
        try:
            self._data_clone(b, dst)
        except BaseException as exc:
            fsutil.unlink_quiet(dst)
            self.store.delete(VOLUMES, volume_id)
            if _is_enospc(exc):
                raise PoolFull(self.clone_reserve, self._space()[2]) from exc
            raise
        self._crash_point("clone", volume_id)
        record = dataclasses.replace(record, state=State.READY)
        self._write(record)
        return record

    def get_volume(self, volume_id: str) -> Volume:
        check_id("volume", volume_id)
        rec = self.store.volume(volume_id)
        if rec is None or not rec.listed:
            raise VolumeNotFound(volume_id)
        return self._volume_of(rec)

    def _rollback_volume(self, volume_id: str, rec: VolumeRecord) -> None:
        """Remove a volume's export, file and record (caller holds its lock)."""
        vol = self._volume_of(rec)
        if vol.device is not None:
            self._data_unexport(vol, vol.device)
        if rec.state is not State.DESTROYING:
            self._write(dataclasses.replace(rec, state=State.DESTROYING, export=None))
        fsutil.unlink_quiet(self.volume_path(volume_id))
        self.store.delete(VOLUMES, volume_id)

    def destroy(self, volume: Volume | str, *, missing_ok: bool = False) -> None:
        volume_id = self._vid(volume)
        with self.store.lock(VOLUMES, volume_id):
            rec = self.store.volume(volume_id)
            if rec is None:
                if missing_ok:
                    return
                raise VolumeNotFound(volume_id)
            vol = self._volume_of(rec)
            if vol.device is not None:
                self._check_not_mounted(vol, vol.device)
            self._rollback_volume(volume_id, rec)

    def export(self, volume: Volume | str, kind: ExportKind) -> Device:
        volume_id = self._vid(volume)
        kind = ExportKind(kind)
        if kind is ExportKind.VFIO_PCI:
            raise NeedsIpu(kind.value, self.backend)
        if kind not in self.export_kinds:
            raise ExportNotSupported(kind.value, self.backend,
                                     sorted(k.value for k in self.export_kinds))
        with self.store.lock(VOLUMES, volume_id):
            rec = self.store.volume(volume_id)
            if rec is None or not rec.listed:
                raise VolumeNotFound(volume_id)
            vol = self._volume_of(rec)
            existing = self._live_export(vol, kind, rec)
            if existing is not None:
                return existing
            brec = self.store.base(vol.base_id)
            if brec is None:
                raise FailedPrecondition(f"base {vol.base_id!r} of volume {volume_id!r} is gone")
            device = self._data_export(vol, self._base_of(brec), kind)
            self._crash_point("export", volume_id)
            try:
                self._write(dataclasses.replace(rec, state=State.EXPORTED, export=device))
            except BaseException:
                self._data_unexport(vol, device)
                raise
            log.info("volume exported", extra={"volume": volume_id, "kind": kind.value,
                                               "device": device.path})
            return device

    def _live_export(self, vol: Volume, kind: ExportKind, rec: VolumeRecord) -> Device | None:
        """The volume's export if it is alive and of ``kind`` (a stale one is removed so
        that it can be rebuilt); None when there is none. Caller holds the volume's lock."""
        if vol.device is None:
            return None
        if not self._data_alive(vol, vol.device):
            self._data_unexport(vol, vol.device)  # stale: rebuild it
            return None
        if vol.device.kind is not kind:
            raise VolumeBusy(vol.id, f"already exported as {vol.device.kind.value}")
        # re-read: a backend may have rebuilt the export (daemon restart)
        current = self._volume_of(self.store.volume(vol.id) or rec)
        return current.device or vol.device

    def _check_not_mounted(self, vol: Volume, device: Device) -> None:
        if (device.major is not None and device.minor is not None
                and mountinfo.device_is_mounted(device.major, device.minor)):
            raise VolumeBusy(vol.id, f"{device.path} is mounted")

    def unexport(self, volume: Volume | str, *, force: bool = False) -> None:
        volume_id = self._vid(volume)
        with self.store.lock(VOLUMES, volume_id):
            rec = self.store.volume(volume_id)
            if rec is None or not rec.listed:
                raise VolumeNotFound(volume_id)
            vol = self._volume_of(rec)
            if vol.device is None:
                return
            if not force:
                self._check_not_mounted(vol, vol.device)
            self._data_unexport(vol, vol.device)
            self._write(dataclasses.replace(rec, state=State.READY, export=None))

    # -- listing, usage, recovery -------------------------------------------------------------

    def list(self) -> Listing:
        bases = tuple(self._base_of(r) for r in self.store.bases()
                      if r.state is State.READY)
        volumes = tuple(self._volume_of(r) for r in self.store.volumes() if r.listed)
        return Listing(bases, volumes)

    def usage(self) -> Usage:
        capacity, used, _free = self._space()
        listing = self.list()
        return Usage(capacity=capacity, used=used, bases=len(listing.bases),
                     volumes=len(listing.volumes),
                     exported=sum(v.device is not None for v in listing.volumes))

    def recover(self) -> None:
        self._clean_tmp()
        for volume_id in self.store.ids(VOLUMES):
            with self.store.lock(VOLUMES, volume_id, blocking=False) as held:
                rec = self.store.volume(volume_id)
                if held and rec is not None:
                    self._recover_volume(rec)
        for base_id in self.store.ids(BASES):
            with self.store.lock(BASES, base_id, blocking=False) as held:
                brec = self.store.base(base_id)
                if held and brec is not None and brec.state is not State.READY:
                    log.warning("rolling back interrupted base operation",
                                extra={"base": base_id, "state": brec.state.value})
                    self._rollback_base(base_id, brec)
        self._remove_orphans(VOLUMES, self.volumes_dir, self.volume_suffix)
        self._remove_orphans(BASES, self.bases_dir, ".img")

    def _recover_volume(self, rec: VolumeRecord) -> None:
        """Roll an interrupted operation back, or repair a lost export (lock held)."""
        if not rec.listed:
            log.warning("rolling back interrupted volume operation",
                        extra={"volume": rec.id, "state": rec.state.value})
            self._rollback_volume(rec.id, rec)
            return
        vol = self._volume_of(rec)
        if vol.device is not None and not self._data_alive(vol, vol.device):
            self._recover_export(vol, vol.device, rec)

    def _recover_export(self, vol: Volume, device: Device, rec: VolumeRecord) -> None:
        """A recorded export is no longer served: by default, forget it."""
        self._data_unexport(vol, device)
        self._write(dataclasses.replace(rec, state=State.READY, export=None))

    def _remove_orphans(self, kind: Kind, directory: Path, suffix: str) -> None:
        for name in os.listdir(directory):
            if not name.endswith(suffix):
                continue
            object_id = name[: -len(suffix)]
            with self.store.lock(kind, object_id, blocking=False) as held:
                if held and self.store.read(kind, object_id) is None:
                    log.warning("removing orphan file", extra={"file": name})
                    loop.detach_all(directory / name)
                    fsutil.unlink_quiet(directory / name)

    def _clean_tmp(self) -> None:
        tmp = self.store.dir / "tmp"
        for name in os.listdir(tmp):
            pid = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    (tmp / name).unlink()

    # -- teardown ----------------------------------------------------------------------------

    def _destroy_everything(self, force: bool) -> None:
        listing = self.store.ids(VOLUMES), self.store.ids(BASES)
        if (listing[0] or listing[1]) and not force:
            raise FailedPrecondition(
                f"pool {self.pool.root} still has {len(listing[0])} volume(s) and "
                f"{len(listing[1])} base(s)")
        for volume_id in listing[0]:
            with self.store.lock(VOLUMES, volume_id):
                rec = self.store.volume(volume_id)
                if rec is not None:
                    self._rollback_volume(volume_id, rec)
        for base_id in listing[1]:
            with self.store.lock(BASES, base_id):
                brec = self.store.base(base_id)
                if brec is not None:
                    self._rollback_base(base_id, brec)

    def _remove_layout(self) -> None:
        for d in (self.volumes_dir, self.bases_dir):
            for name in os.listdir(d):
                loop.detach_all(d / name)
                fsutil.unlink_quiet(d / name)
        shutil.rmtree(self.pool.data_dir / "meta", ignore_errors=True)
        for d in (self.volumes_dir, self.bases_dir):
            with contextlib.suppress(FileNotFoundError, OSError):
                d.rmdir()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @contextlib.contextmanager
    def _quiet(self, what: str) -> Iterator[None]:
        """os-brick's tolerant teardown: log a failed step and go on."""
        try:
            yield
        except Exception:
            log.warning("teardown step failed", exc_info=True, extra={"step": what})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
