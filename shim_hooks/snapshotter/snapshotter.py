"""containerd's snapshotter semantics over local overlayfs snapshots and remote chains.

Local snapshots behave as containerd's ``overlayfs`` snapshotter's do (same directory shape,
same mounts, same error classes: NotFound, AlreadyExists, InvalidArgument for a parent that
is not committed, FailedPrecondition for a Commit of a non-active snapshot, a Remove of a
snapshot with children or Mounts of a committed one). The differences, all of them on
remote chains (see :mod:`shim_hooks.snapshotter`):

* an unpack ``Prepare`` with CRI's image labels may commit a remote snapshot and answer
  ALREADY_EXISTS (:meth:`Snapshotter.prepare`);
* a lowerdir stack ends, at the first remote ancestor, in that ancestor's lower (the IPU's
  base, mounted read-only) instead of going on through per-layer directories;
* remote snapshots use no space on the host (Usage 0).

Metadata changes are serialized by one lock; the IPU's pulls and the lowers' mounts run
outside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from kata_ipu.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KataIpuError,
    NotFound,
    Unavailable,
)
from shim_hooks.snapshotter import chain
from shim_hooks.snapshotter.filters import matcher
from shim_hooks.snapshotter.lowers import Lowers, chain_image
from shim_hooks.snapshotter.model import (
    REMOTE_LABEL,
    SNAPSHOT_REF,
    Info,
    Kind,
    Mount,
    RemoteImage,
    Snapshot,
    Usage,
    inherited,
)
from shim_hooks.snapshotter.remote import FallBack, LayerRequest, RemoteChains
from shim_hooks.snapshotter.store import Lower, LowerNotReady, MetaStore

log = logging.getLogger("shim_hooks.snapshotter")


def disk_usage(path: Path) -> Usage:
    """Allocated bytes and inodes under ``path`` (hard links once), as containerd's
    ``fs.DiskUsage`` counts them."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for top, dirs, files in os.walk(path):
        for name in (top, *(os.path.join(top, f) for f in files),
                     *(os.path.join(top, d) for d in dirs)):
            try:
                st = os.lstat(name)
            except FileNotFoundError:
                continue
            ino = (st.st_dev, st.st_ino)
            if ino in seen:
                continue
            seen.add(ino)
            size += st.st_blocks * 512
    return Usage(size, len(seen))


class Snapshotter:
    def __init__(self, root: Path, store: MetaStore, *, lowers: Lowers | None = None,
                 remote: RemoteChains | None = None, remove_images: bool = True,
                 lower_linger: float = 0.0) -> None:
        self.root = root
        self.store = store
        self.lowers = lowers
        self.remote = remote
        self.remove_images = remove_images
        self.lower_linger = lower_linger
        self._lingering: dict[int, asyncio.TimerHandle] = {}
        self.snapshots_dir = root / "snapshots"
        self.index_off = os.path.exists("/sys/module/overlay/parameters/index")
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Future[None]] = set()
        for d in (self.snapshots_dir, root / chain.LOWERS_DIR, root / chain.HINTS_DIR):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def open(cls, root: Path, **kwargs: object) -> Snapshotter:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(root, MetaStore(root / "metadata.db"), **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ helpers
    def fs_path(self, snap: Snapshot | int) -> Path:
        sid = snap if isinstance(snap, int) else snap.id
        return self.snapshots_dir / str(sid) / "fs"

    def _work_path(self, snap: Snapshot) -> Path:
        return self.snapshots_dir / str(snap.id) / "work"

    async def _get(self, key: str) -> Snapshot:
        snap = await asyncio.to_thread(self.store.get, key)
        if snap is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return snap

    def _info(self, snap: Snapshot) -> Info:
        return Info(snap.name, snap.parent, snap.kind, snap.created, snap.updated,
                    dict(snap.labels))

    def _chain(self, snap: Snapshot) -> tuple[list[Snapshot], Snapshot | None]:
        """The local committed ancestors of ``snap`` (nearest first) down to its first
        remote ancestor (returned apart), or to the chain's root."""
        local: list[Snapshot] = []
        parent = snap.parent
        while parent:
            p = self.store.get(parent)
            if p is None:
                raise NotFound(f"parent {parent!r} of snapshot {snap.name!r} does not exist")
            if p.remote is not None:
                return local, p
            local.append(p)
            parent = p.parent
        return local, None

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        local, remote = self._chain(snap)
        paths = [str(self.fs_path(p)) for p in local]
        if remote is not None:
            if snap.lower is None or self.lowers is None:
                raise FailedPrecondition(f"snapshot {snap.name!r} stacks on remote snapshot "
                                         f"{remote.name!r}, whose files are on the IPU")
            paths.append(str(self.lowers.mountpoint(snap.lower)))
        if not paths:
            flag = "ro" if snap.kind is Kind.VIEW else "rw"
            return [Mount("bind", str(self.fs_path(snap)), (flag, "rbind"))]
        options = ["index=off"] if self.index_off else []
        if snap.kind is Kind.ACTIVE:
            options += [f"workdir={self._work_path(snap)}", f"upperdir={self.fs_path(snap)}"]
        elif len(paths) == 1:
            return [Mount("bind", paths[0], ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(paths))
        return [Mount("overlay", "overlay", tuple(options))]

    # ------------------------------------------------------------------ create
    async def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """An active snapshot; or, for an unpack whose layer the IPU holds, a remote commit
        of the layer's chain and ALREADY_EXISTS (containerd then skips the layer)."""
        req = LayerRequest.of(labels) if self.remote is not None else None
        if req is not None:
            await self._commit_remote(key, parent, labels, req)
        return await self._create(Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return await self._create(Kind.VIEW, key, parent, labels)

    async def _commit_remote(self, key: str, parent: str, labels: dict[str, str],
                             req: LayerRequest) -> None:
        """Commit ``req.target`` as a remote snapshot and raise AlreadyExists; return
        (nothing done) when the layer falls back to the host."""
        assert self.remote is not None
        async with self._lock:
            if await asyncio.to_thread(self.store.get, key) is not None:
                return  # the local path says AlreadyExists
            depth = 1
            if parent:
                p = await asyncio.to_thread(self.store.get, parent)
                if p is None or p.kind is not Kind.COMMITTED:
                    return  # the local path says what is wrong
                depth = p.depth + 1
            if await asyncio.to_thread(self.store.find_remote, req.target, parent):
                raise AlreadyExists(f"target snapshot {req.target!r}: on the IPU already")
        try:
            image = await self.remote.image(req, depth)
        except FallBack as exc:
            log.warning("layer %d of %s prepared on the host: %s", depth, req.image_ref, exc,
                        extra={"chain_id": req.target})
            return
        async with self._lock:
            if await asyncio.to_thread(self.store.find_remote, req.target, parent) is None:
                name = f"ipu/{uuid.uuid4().hex[:12]}/{req.target}"
                await asyncio.to_thread(
                    self.store.create, Kind.COMMITTED, name, parent,
                    {**inherited(labels), REMOTE_LABEL: image.label()}, depth, remote=image)
                log.info("layer on the IPU", extra={"snapshot": name, "image": image.reference,
                                                    "layers": f"{depth}/{image.total}"})
        raise AlreadyExists(f"target snapshot {req.target!r}: on the IPU already")

    async def _create(self, kind: Kind, key: str, parent: str,
                      labels: dict[str, str]) -> list[Mount]:
        def local() -> tuple[list[Mount] | None, Snapshot | None, RemoteImage | None]:
            """One trip to a worker thread for a snapshot on local layers (the usual case)."""
            if self.store.get(key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            p = None
            if parent:
                p = self.store.get(parent)
                if p is None:
                    raise NotFound(f"parent snapshot {parent!r} does not exist")
                if p.kind is not Kind.COMMITTED:
                    raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
                _, remote = self._chain_of_parent(p)
                if remote is not None:
                    assert remote.remote is not None
                    return self._on_mounted_lower(kind, key, p, labels, remote.remote), p, \
                        remote.remote
            return self._mounts(self._create_local(kind, key, p, labels, None)), p, None

        async with self._lock:
            mounts, p, base = await asyncio.to_thread(local)
        if mounts is not None:
            return mounts
        assert p is not None and base is not None
        if self.lowers is None:
            raise FailedPrecondition(f"parent {parent!r} is on the IPU, which this snapshotter "
                                     "is not configured to reach")
        return await self._create_on_lower(kind, key, p, labels, base)

    def _on_mounted_lower(self, kind: Kind, key: str, parent: Snapshot, labels: dict[str, str],
                          image: RemoteImage) -> list[Mount] | None:
        """The snapshot and its mounts if its lower is mounted already (a warm container: no
        IPU, no lock), else None for :meth:`_create_on_lower`."""
        lower = self.store.find_lower(image)
        if self.lowers is None or lower is None or not self.lowers.mounted(lower):
            return None
        try:
            snap = self._create_local(kind, key, parent, labels, lower.id, lower_mounted=True)
        except LowerNotReady:  # being released right now: the slow path waits for that
            return None
        try:
            return self._finish_on_lower(snap, parent, lower.id, image)
        except BaseException:
            self._drop(snap)
            raise

    def _chain_of_parent(self, p: Snapshot) -> tuple[list[Snapshot], Snapshot | None]:
        if p.remote is not None:
            return [], p
        local, remote = self._chain(p)
        return [p, *local], remote

    def _create_local(self, kind: Kind, key: str, parent: Snapshot | None,
                      labels: dict[str, str], lower: int | None, *,
                      lower_mounted: bool = False) -> Snapshot:
        """The row and its directories (made aside, then renamed into place, so that a
        crash leaves either nothing or a directory no row names, which recovery removes)."""
        tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
        try:
            (tmp / "fs").mkdir(mode=0o755)
            if kind is Kind.ACTIVE:
                (tmp / "work").mkdir(mode=0o711)
            if parent is not None and parent.remote is None:
                st = os.stat(self.fs_path(parent))
                os.lchown(tmp / "fs", st.st_uid, st.st_gid)
            depth = parent.depth + 1 if parent is not None else 1
            snap = self.store.create(kind, key, parent.name if parent else "", labels, depth,
                                     lower=lower, lower_mounted=lower_mounted)
            try:
                os.rename(tmp, self.snapshots_dir / str(snap.id))
            except BaseException:
                self.store.delete(key)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return snap

    async def _create_on_lower(self, kind: Kind, key: str, parent: Snapshot,
                               labels: dict[str, str], image: RemoteImage) -> list[Mount]:
        assert self.lowers is not None
        failed: BaseException | None = None
        async with self.lowers.hold(image) as held:
            async with self._lock:
                snap = await asyncio.to_thread(self._create_local, kind, key, parent, labels,
                                               held.id)
            try:
                lower = await self.lowers.ensure(held)
                return await asyncio.to_thread(self._finish_on_lower, snap, parent, lower.id,
                                               image)
            except BaseException as exc:
                async with self._lock:
                    await asyncio.to_thread(self._drop, snap)
                failed = exc
        await self.lowers.release_unused(held.id)  # unless someone else stacks on it
        if isinstance(failed, KataIpuError | OSError) and not isinstance(failed,
                                                                          FailedPrecondition):
            raise Unavailable(f"snapshot {key!r} stacks on {image.reference} (its first "
                              f"{image.layers} layers), whose files are on the IPU, and the "
                              f"IPU could not give them: {failed}") from failed
        raise failed

    def _finish_on_lower(self, snap: Snapshot, parent: Snapshot, lower_id: int,
                         image: RemoteImage) -> list[Mount]:
        """Directly on the remote chain: the upper dir owned as the image's root is (as
        containerd's overlayfs does from the parent's), and the hint the shim proxy reads."""
        assert self.lowers is not None
        if parent.remote is not None:
            root = os.stat(self.lowers.mountpoint(lower_id))
            os.lchown(self.fs_path(snap), root.st_uid, root.st_gid)
            self._hint(snap, lower_id, image)
        return self._mounts(snap)

    def _hint(self, snap: Snapshot, lower_id: int, image: RemoteImage) -> None:
        split = chain.split_backend_key(snap.name)
        if split is not None:
            chain.write_hint(self.root, *split, lower_id, chain_image(image))

    def _drop(self, snap: Snapshot) -> None:
        self.store.delete(snap.name)
        split = chain.split_backend_key(snap.name)
        if split is not None:
            chain.remove_hint(self.root, *split)
        shutil.rmtree(self.snapshots_dir / str(snap.id), ignore_errors=True)

    # ------------------------------------------------------------------ the rest
    async def mounts(self, key: str) -> list[Mount]:
        def look() -> tuple[Snapshot, list[Mount] | None, Lower | None]:
            snap = self.store.get(key)
            if snap is None:
                raise NotFound(f"snapshot {key!r} does not exist")
            if snap.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(f"snapshot {key!r} is not active or view")
            if snap.lower is not None and self.lowers is not None:
                lower = self.store.get_lower(snap.lower)
                if lower is not None and not self.lowers.mounted(lower):
                    return snap, None, lower
            return snap, self._mounts(snap), None

        snap, mounts, lower = await asyncio.to_thread(look)
        if mounts is not None:
            return mounts
        assert lower is not None and self.lowers is not None
        async with self.lowers.hold(lower.image) as held:  # again, after a restart or so
            await self.lowers.ensure(held)
        return await asyncio.to_thread(self._mounts, snap)

    async def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        async with self._lock:
            snap = await self._get(key)
            if snap.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            usage = await asyncio.to_thread(disk_usage, self.fs_path(snap))
            await asyncio.to_thread(self.store.commit, key, name, labels, usage.size,
                                    usage.inodes)
            split = chain.split_backend_key(key)
            if split is not None:
                await asyncio.to_thread(chain.remove_hint, self.root, *split)
        if snap.lower is not None:
            self._later(self._release_lower(snap.lower))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` after the call returns. containerd removes backend snapshots inside
        its garbage collection, holding its snapshotter lock: every other snapshot call of
        every namespace waits, and its scheduler spaces collections by 49 times their
        average length (a 2% pause budget). An unmount and an IPU round trip are not worth
        that; a failure is logged, and the next start finishes what is left."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_lower(self, lower_id: int) -> None:
        """Release a lower nothing stacks on any more, ``lower_linger`` seconds from now: a
        job's next container, a function scaled back up from zero, finds it still mounted
        (re-making it costs an IPU clone, an export and a mount on the container's path)."""
        if self.lowers is None:
            return
        if self.lower_linger > 0:
            old = self._lingering.pop(lower_id, None)
            if old is not None:
                old.cancel()
            self._lingering[lower_id] = asyncio.get_running_loop().call_later(
                self.lower_linger, lambda: self._later(self._release_now(lower_id)))
            return
        await self._release_now(lower_id)

    async def _release_now(self, lower_id: int) -> None:
        self._lingering.pop(lower_id, None)
        assert self.lowers is not None
        try:
            await self.lowers.release_unused(lower_id)
        except (KataIpuError, OSError) as exc:
            log.warning("lower %s not released (the next start retries): %s", lower_id, exc)

    async def drain(self) -> None:
        """Wait for the work :meth:`_later` started (before the process exits). Lingering
        lowers stay mounted: the next start releases those nothing uses."""
        for timer in self._lingering.values():
            timer.cancel()
        self._lingering.clear()
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def remove(self, key: str) -> None:
        async with self._lock:
            snap = await self._get(key)
            if await asyncio.to_thread(self.store.children, key):
                raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
            await asyncio.to_thread(self._drop, snap)
            last_of_image = (snap.remote is not None and not await asyncio.to_thread(
                self.store.remote_uses, snap.remote.manifest))
        if snap.lower is not None:
            self._later(self._release_lower(snap.lower))
        if last_of_image and snap.remote is not None and self.remote is not None:
            if self.remove_images:
                self._later(self.remote.remove_image(snap.remote))
            else:
                self.remote.forget(snap.remote.manifest)

    async def stat(self, key: str) -> Info:
        return self._info(await self._get(key))

    async def update(self, info: Info, fieldpaths: list[str]) -> Info:
        """Labels only, as containerd's storage does: ``labels`` replaces them,
        ``labels.<key>`` sets one (removes it if ``info`` lacks it); no paths: replace."""
        async with self._lock:
            snap = await self._get(info.name)
            labels = dict(snap.labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path.removeprefix("labels.")
                    labels[k] = info.labels.get(k, "")
                elif path == "labels":
                    labels = dict(info.labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot "
                                          f"{info.name!r}")
            if not fieldpaths:
                labels = dict(info.labels)
            labels = {k: v for k, v in labels.items() if v}  # an empty value removes a label
            if snap.remote is not None:
                labels.setdefault(SNAPSHOT_REF, snap.labels.get(SNAPSHOT_REF, ""))
            return self._info(await asyncio.to_thread(self.store.set_labels, info.name,
                                                      labels))

    async def walk(self, filters: list[str]) -> list[Info]:
        match = matcher(filters)
        return [info for snap in await asyncio.to_thread(self.store.all)
                if match(info := self._info(snap))]

    async def usage(self, key: str) -> Usage:
        snap = await self._get(key)
        if snap.kind is Kind.ACTIVE:
            return await asyncio.to_thread(disk_usage, self.fs_path(snap))
        return Usage(snap.size, snap.inodes)

    async def cleanup(self) -> list[str]:
        """Remove directories and hints no snapshot owns (containerd calls this after its
        garbage collection; the start does it too)."""
        async with self._lock:
            return await asyncio.to_thread(self._cleanup)

    def _cleanup(self) -> list[str]:
        done = []
        snaps = self.store.all()
        ids = {str(s.id) for s in snaps}
        for entry in self.snapshots_dir.iterdir():
            if entry.name not in ids:
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {entry}")
        hints = {chain.hint_path(self.root, *split) for s in snaps
                 if s.lower is not None and (split := chain.split_backend_key(s.name))}
        for hint in (self.root / chain.HINTS_DIR).glob("*.json"):
            if hint not in hints:
                hint.unlink(missing_ok=True)
                done.append(f"removed hint {hint.name}")
        return done

    async def recover(self) -> list[str]:
        """At start, before serving: leftovers of a crash removed, lowers in use mounted."""
        done = await self.cleanup()
        if self.lowers is not None:
            users: Callable[[int], int] = self.store.lower_users
            done += await self.lowers.recover(users)
        for line in done:
            log.warning("recovery: %s", line)
        return done
