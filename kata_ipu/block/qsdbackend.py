"""The ``qsd`` backend: one long-lived ``qemu-storage-daemon`` per pool, driven over QMP.

A base is a read-only ``raw`` node; a clone is a qcow2 overlay file whose backing node is the
base's node. Exports: vhost-user-blk, NBD (one unix-socket NBD server per daemon), FUSE (the
disk appears as a regular file), and a host block device (a FUSE export with a loop device on
top). Works on any filesystem: no reflink needed.

Restarts: every operation first checks that the daemon recorded in the run directory is alive
and connected; if it is not, a new daemon is started and its nodes and exports are re-created
from the records on disk (a host block device gets a new loop device, since the old one was
bound to the dead FUSE file).

The daemon's QMP monitor serves one client at a time, so one process drives a ``qsd`` pool
at a time (kata-ipud); another process must wait until the first calls :meth:`close`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from qemu.qmp.qmp_client import ExecuteError

from kata_ipu.block import fsutil, loop, qsd
from kata_ipu.block.engine import StoreTarget
from kata_ipu.block.model import Base, Device, ExportKind, Pool, State, Volume, short_name
from kata_ipu.block.qsd import QmpLink
from kata_ipu.block.records import Kind, VolumeRecord
from kata_ipu.executor import DEFAULT, Executor
from kata_ipu.osutil import mountinfo

log = logging.getLogger("kata_ipu.block")


class QsdTarget(StoreTarget):
    backend: ClassVar[str] = "qsd"
    export_kinds: ClassVar[frozenset[ExportKind]] = frozenset(
        {ExportKind.HOST_BLOCK, ExportKind.VHOST_USER_BLK, ExportKind.NBD, ExportKind.FUSE})
    volume_suffix: ClassVar[str] = ".qcow2"
    clone_reserve: ClassVar[int] = 1 << 20

    def __init__(self, pool: Pool, run_dir: Path, executor: Executor = DEFAULT) -> None:
        super().__init__(pool, run_dir, executor)
        self.qmp_sock = run_dir / "qmp.sock"
        self.nbd_sock = run_dir / "nbd.sock"
        self.pidfile = run_dir / "qsd.pid"
        self._link: QmpLink | None = None
        self._mutex = threading.Lock()
        self.restarts = 0
        self._known_bases: set[tuple[int | None, str]] = set()  # (daemon pid, base id)

    # -- daemon --------------------------------------------------------------------------

    @property
    def daemon_pid(self) -> int | None:
        return qsd.read_pid(self.pidfile, str(self.qmp_sock))

    @contextlib.contextmanager
    def _daemon_lock(self) -> Iterator[None]:
        fd = os.open(self.run_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _qmp(self) -> QmpLink:
        """A connected link to a live daemon, (re)starting the daemon if needed."""
        link = self._link
        if link is not None and link.connected and self.daemon_pid is not None:
            return link
        with self._mutex, self._daemon_lock():
            if self._link is None:
                self._link = QmpLink(self.qmp_sock)
            link = self._link
            if self.daemon_pid is not None:
                if not link.connected:
                    link.connect()
                return link
            link.disconnect()
            self._start_daemon(link)
            return link

    def _start_daemon(self, link: QmpLink) -> None:
        had_exports = any(r.export is not None for r in self.store.volumes())
        for sock in (self.qmp_sock, self.nbd_sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        qsd.spawn([
            "--chardev", f"socket,id=m0,path={self.qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
        ], self.pidfile, self.executor)
        link.connect()
        for brec in self.store.bases():
            if brec.state is State.READY:
                self._add_base_node(link, self._base_of(brec))
        if had_exports:
            self.restarts += 1
            log.warning("qemu-storage-daemon restarted; re-creating exports",
                        extra={"pool": str(self.pool.root)})
        for rec in self.store.volumes():
            vol = self._volume_of(rec)
            if vol.device is None:
                continue
            self._teardown_export(None, vol, vol.device)
            device = self._create_export(link, vol, vol.device.kind)
            self._write(dataclasses.replace(rec, export=device))

    # -- nodes ---------------------------------------------------------------------------

    @staticmethod
    def _base_node(base_id: str) -> str:
        return short_name("b", base_id)

    @staticmethod
    def _vol_node(volume_id: str) -> str:
        return short_name("v", volume_id)

    @staticmethod
    def _export_id(volume_id: str) -> str:
        return short_name("e", volume_id)

    def _fuse_file(self, volume_id: str) -> Path:
        return self.run_dir / f"{short_name('f', volume_id)}.disk"

    def _vhost_sock(self, volume_id: str) -> Path:
        return self.run_dir / f"{short_name('s', volume_id)}.sock"

    def _add_node(self, link: QmpLink, args: dict[str, Any]) -> None:
        """``blockdev-add`` unless the node exists (asked only if the add fails, because
        ``query-named-block-nodes`` grows with every node and is slow with hundreds)."""
        try:
            link.execute("blockdev-add", args)
        except ExecuteError:
            if not self._node_exists(link, args["node-name"]):
                raise

    def _del_node(self, link: QmpLink, node: str) -> None:
        try:
            link.execute("blockdev-del", {"node-name": node})
        except ExecuteError:
            if self._node_exists(link, node):
                raise

    def _add_base_node(self, link: QmpLink, base: Base) -> None:
        key = (self.daemon_pid, base.id)
        if key in self._known_bases:
            return
        self._add_node(link, {
            "driver": "raw", "node-name": self._base_node(base.id), "read-only": True,
            "file": {"driver": "file", "filename": str(base.path), "read-only": True},
        })
        self._known_bases.add(key)

    @staticmethod
    def _node_exists(link: QmpLink, node: str) -> bool:
        nodes = link.execute("query-named-block-nodes", {"flat": True})
        return any(n.get("node-name") == node for n in nodes)

    @staticmethod
    def _export_exists(link: QmpLink, export_id: str) -> bool:
        return any(e.get("id") == export_id for e in link.execute("query-block-exports"))

    def qsd_nodes(self) -> list[str]:
        """Named nodes of the daemon (for tests and diagnostics); [] if it is not running."""
        if self.daemon_pid is None:
            return []
        nodes = self._qmp().execute("query-named-block-nodes", {"flat": True})
        return sorted(n["node-name"] for n in nodes if not n["node-name"].startswith("#"))

    def qsd_exports(self) -> list[str]:
        if self.daemon_pid is None:
            return []
        return sorted(e["id"] for e in self._qmp().execute("query-block-exports"))

    # -- hooks ---------------------------------------------------------------------------

    def _space(self) -> tuple[int, int, int]:
        used = 0
        for d in (self.bases_dir, self.volumes_dir):
            for entry in os.scandir(d):
                with contextlib.suppress(FileNotFoundError):
                    used += entry.stat().st_blocks * 512
        _total, _fs_used, fs_free = fsutil.statvfs_space(self.pool.data_dir)
        return self.pool.capacity, used, max(0, min(self.pool.capacity - used, fs_free))

    def _base_added(self, base: Base) -> None:
        self._add_base_node(self._qmp(), base)

    def _base_removing(self, base: Base) -> None:
        if self.daemon_pid is None:
            return
        self._del_node(self._qmp(), self._base_node(base.id))
        self._known_bases = {k for k in self._known_bases if k[1] != base.id}

    def _data_clone(self, base: Base, dst: Path) -> None:
        self.executor.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                           str(base.path), "-F", "raw", str(dst), str(base.size)], timeout=60)

    def _data_export(self, volume: Volume, base: Base, kind: ExportKind) -> Device:
        link = self._qmp()
        self._add_base_node(link, base)
        return self._create_export(link, volume, kind)

    def _create_export(self, link: QmpLink, volume: Volume, kind: ExportKind) -> Device:
        node, eid = self._vol_node(volume.id), self._export_id(volume.id)
        self._add_node(link, {
            "driver": "qcow2", "node-name": node, "backing": self._base_node(volume.base_id),
            "file": {"driver": "file", "filename": str(volume.path)},
        })
        try:
            return self._add_export(link, volume, kind, node, eid)
        except BaseException:
            self._teardown_export(link, volume, None)
            raise

    def _add_export(self, link: QmpLink, volume: Volume, kind: ExportKind, node: str,
                    eid: str) -> Device:
        base_args: dict[str, Any] = {"id": eid, "node-name": node, "writable": True}
        if kind is ExportKind.VHOST_USER_BLK:
            sock = self._vhost_sock(volume.id)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            link.execute("block-export-add", {**base_args, "type": "vhost-user-blk",
                                              "addr": {"type": "unix", "path": str(sock)}})
            return Device(volume.id, kind, str(sock), volume.size, volume.serial,
                          socket=str(sock))
        if kind is ExportKind.NBD:
            link.execute("block-export-add", {**base_args, "type": "nbd", "name": volume.id})
            uri = f"nbd+unix:///{volume.id}?socket={self.nbd_sock}"
            return Device(volume.id, kind, uri, volume.size, volume.serial,
                          socket=str(self.nbd_sock))
        fuse = self._fuse_file(volume.id)
        fuse.touch(mode=0o600, exist_ok=True)
        link.execute("block-export-add", {**base_args, "type": "fuse",
                                          "mountpoint": str(fuse)})
        if kind is ExportKind.FUSE:
            return Device(volume.id, kind, str(fuse), volume.size, volume.serial)
        dev = loop.attach(fuse, direct_io=False, name=f"kata-ipu:{volume.serial}")
        return Device(volume.id, kind, dev.path, dev.size, volume.serial,
                      major=dev.major, minor=dev.minor)

    def _data_unexport(self, volume: Volume, device: Device) -> None:
        self._teardown_export(self._qmp(), volume, device)

    def _teardown_export(self, link: QmpLink | None, volume: Volume,
                         device: Device | None) -> None:
        """Loop, export, node, files: each removed if present (os-brick's tolerant teardown)."""
        fuse = self._fuse_file(volume.id)
        # the recorded loop first (no scan of every loop); a full scan only if it is not there
        if device is None or (device.kind is ExportKind.HOST_BLOCK and (
                device.minor is None or not loop.detach(device.minor, fuse))):
            loop.detach_all(fuse)
        if link is not None:
            eid, node = self._export_id(volume.id), self._vol_node(volume.id)
            try:
                link.execute("block-export-del", {"id": eid})
            except ExecuteError:
                pass  # no such export (or already shutting down): the wait below tells
            self._wait_export_gone(link, eid)
            self._del_node(link, node)
        if mountinfo.mount_source(fuse) is not None:  # a dead daemon's FUSE mount
            self.executor.run(["umount", "-l", str(fuse)], check=False, timeout=30)
        for path in (fuse, self._vhost_sock(volume.id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _wait_export_gone(self, link: QmpLink, eid: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._export_exists(link, eid):
            if time.monotonic() > deadline:  # a client still holds it: disconnect it
                with contextlib.suppress(ExecuteError):
                    link.execute("block-export-del", {"id": eid, "mode": "hard"})
                deadline = time.monotonic() + timeout
            time.sleep(0.002)

    def _data_alive(self, volume: Volume, device: Device) -> bool:
        # _qmp() first: a dead daemon is restarted here and its exports re-created
        if not self._export_exists(self._qmp(), self._export_id(volume.id)):
            return False
        if device.kind is ExportKind.HOST_BLOCK and device.minor is not None:
            served = loop.backing_file(device.minor)
            return served == os.path.realpath(self._fuse_file(volume.id))
        return True

    def _recover_export(self, vol: Volume, device: Device, rec: VolumeRecord) -> None:
        """Re-create an export the daemon lost (its nodes come back from the records)."""
        link = self._qmp()
        self._teardown_export(link, vol, device)
        brec = self.store.base(vol.base_id)
        if brec is None:
            super()._recover_export(vol, device, rec)
            return
        self._add_base_node(link, self._base_of(brec))
        new = self._create_export(link, vol, device.kind)
        self._write(dataclasses.replace(rec, export=new))

    def recover(self) -> None:
        link = self._qmp()  # restarts the daemon (and its exports) if it died
        super().recover()
        # exports and nodes of volumes not recorded as exported (a crash mid-export)
        exports = set(self.qsd_exports())
        nodes = set(self.qsd_nodes())
        for rec in self.store.volumes():
            vid = rec.id
            if rec.export is None and (self._export_id(vid) in exports
                                       or self._vol_node(vid) in nodes
                                       or self._fuse_file(vid).exists()):
                with self.store.lock(Kind.VOLUMES, vid, blocking=False) as held:
                    if held:
                        log.warning("removing unrecorded export", extra={"volume": vid})
                        self._teardown_export(link, self._volume_of(rec), None)

    # -- teardown ------------------------------------------------------------------------

    def stop_daemon(self) -> None:
        """Stop the pool's daemon (exports go with it; records keep them for a restart)."""
        with self._mutex:
            if self._link is not None:
                self._link.disconnect()
            qsd.stop(self.pidfile, str(self.qmp_sock))

    def close(self) -> None:
        with self._mutex:
            if self._link is not None:
                self._link.close()
                self._link = None

    def destroy_pool(self, *, force: bool = False) -> None:
        self._destroy_everything(force)
        self.stop_daemon()
        self.close()
        for path in (self.qmp_sock, self.nbd_sock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._remove_layout()
        fsutil.unlink_quiet(self.pool.root / "pool.json")
        with contextlib.suppress(FileNotFoundError, OSError):
            self.pool.data_dir.rmdir()

