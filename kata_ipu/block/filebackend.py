"""The ``file`` backend (default software IPU): bases and clones are files on a reflink-capable
filesystem (XFS ``reflink=1``), clones are ``FICLONE`` reflinks, the host export is a loop
device configured with ``LOOP_CONFIGURE`` and the VM export a vhost-user-blk socket served by a
per-export ``qemu-storage-daemon``."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import ClassVar

from kata_ipu.block import fsutil, loop, qsd, xfspool
from kata_ipu.block.engine import StoreTarget
from kata_ipu.block.model import Base, Device, ExportKind, Volume, short_name

log = logging.getLogger("kata_ipu.block")


class FileTarget(StoreTarget):
    backend: ClassVar[str] = "file"
    export_kinds: ClassVar[frozenset[ExportKind]] = frozenset(
        {ExportKind.HOST_BLOCK, ExportKind.VHOST_USER_BLK})
    clone_reserve: ClassVar[int] = 256 << 10

    def _data_clone(self, base: Base, dst: Path) -> None:
        fsutil.reflink(base.path, dst)

    def _space(self) -> tuple[int, int, int]:
        return fsutil.statvfs_space(self.pool.data_dir)

    # -- exports -----------------------------------------------------------------------------

    def _vhost_files(self, volume: Volume) -> tuple[Path, Path]:
        name = short_name("v", volume.id)
        return self.run_dir / f"{name}.sock", self.run_dir / f"{name}.pid"

    def _data_export(self, volume: Volume, base: Base, kind: ExportKind) -> Device:
        if kind is ExportKind.HOST_BLOCK:
            # the largest logical block size the filesystem allows lets direct I/O stay on
            block = 4096 if loop.fs_block_size(base.path) >= 4096 else 512
            dev = loop.attach(volume.path, direct_io=True, block_size=block,
                              name=f"kata-ipu:{volume.serial}")
            return Device(volume.id, kind, dev.path, dev.size, volume.serial,
                          major=dev.major, minor=dev.minor)
        sock, pidfile = self._vhost_files(volume)
        qsd.stop(pidfile, str(sock))
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        qsd.spawn([
            "--blockdev", f"driver=file,node-name=f0,filename={volume.path},cache.direct=on",
            "--blockdev", "driver=raw,node-name=d0,file=f0",
            "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                        f"addr.path={sock},writable=on",
        ], pidfile, self.executor)
        return Device(volume.id, kind, str(sock), volume.size, volume.serial, socket=str(sock))

    def _data_unexport(self, volume: Volume, device: Device) -> None:
        if device.kind is ExportKind.HOST_BLOCK:
            if device.minor is None or not loop.detach(device.minor, volume.path):
                loop.detach_all(volume.path)  # not where the record says: look everywhere
            return
        sock, pidfile = self._vhost_files(volume)
        qsd.stop(pidfile, str(sock))
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()

    def _data_alive(self, volume: Volume, device: Device) -> bool:
        if device.kind is ExportKind.HOST_BLOCK:
            if device.minor is None:
                return False
            served = loop.backing_file(device.minor)
            return served is not None and served == os.path.realpath(volume.path)
        sock, pidfile = self._vhost_files(volume)
        return qsd.read_pid(pidfile, str(sock)) is not None and sock.exists()

    def _stop_orphan_daemons(self) -> None:
        """Daemons serving volumes that are no longer recorded as vhost exports."""
        live = set()
        for rec in self.store.volumes():
            if rec.export is not None and rec.export.kind is ExportKind.VHOST_USER_BLK:
                live.add(short_name("v", rec.id))
        for name in os.listdir(self.run_dir):
            if name.endswith(".pid") and name[:-4] not in live:
                sock = self.run_dir / f"{name[:-4]}.sock"
                qsd.stop(self.run_dir / name, str(sock))
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()

    def recover(self) -> None:
        super().recover()
        self._stop_orphan_daemons()
        self._detach_orphan_loops()

    def _detach_orphan_loops(self) -> None:
        """Loops on volume files whose record has no host export (a crash between the
        attach and the record write): one sysfs scan for the whole pool."""
        recorded = set()
        for rec in self.store.volumes():
            if rec.export is not None and rec.export.minor is not None:
                recorded.add(rec.export.minor)
        for minor, served in loop.find_under(self.volumes_dir):
            if minor not in recorded:
                log.warning("detaching orphan loop device", extra={"loop": f"loop{minor}",
                                                                   "file": served})
                loop.detach(minor, served)

    def close(self) -> None:
        pass

    def destroy_pool(self, *, force: bool = False) -> None:
        self._destroy_everything(force)
        with self._quiet("stop daemons"):
            self._stop_orphan_daemons()
        self._remove_layout()
        image = self.pool.root / POOL_IMAGE
        if image.exists():
            xfspool.unmount(image, self.pool.data_dir, self.executor)
            fsutil.unlink_quiet(image)
        with contextlib.suppress(FileNotFoundError, OSError):
            self.pool.data_dir.rmdir()
        fsutil.unlink_quiet(self.pool.root / POOL_CONFIG)


POOL_CONFIG = "pool.json"
POOL_IMAGE = "pool.xfs"
