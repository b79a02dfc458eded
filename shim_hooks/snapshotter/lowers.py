"""Lowers: the IPU's base of (image, first k layers) as a read-only directory on the host.

A lower is one private copy-on-write clone of the base, prepared on the IPU under a key of
this host (``snap-<instance>-<manifest hex>-<k>``), exported as a host block device and
mounted read-only at ``<root>/lowers/<id>/fs`` (ext4 without its journal: nothing writes to
it). Every overlay of a snapshot stacked on that remote chain shares it. ``lower.json``
beside the mount point names the image (:mod:`shim_hooks.snapshotter.chain`).

Lifecycle (a row in the metadata store, :class:`~shim_hooks.snapshotter.store.Lower`)::

    hold(image) ─▶ row MOUNTING ─▶ [caller records its snapshot with the lower's id]
                ─▶ IPU Prepare (idempotent by key) ─▶ mount ─▶ MOUNTED
    release_unused(id), no snapshot uses it ─▶ RELEASING ─▶ umount ─▶ IPU Release ─▶ row gone

Who uses a lower is read from the store (active and view snapshots carry its id), never
counted separately, so a crash cannot leave a count wrong; :meth:`Lowers.recover` mounts the
lowers in use again and releases the rest. Calls on one lower are serialized.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from kata_ipu.errors import FailedPrecondition, KataIpuError
from kata_ipu.osutil.mountinfo import mount_source, mounts_under
from shim_hooks import hostmount, ipu
from shim_hooks.snapshotter.chain import ChainImage, lower_dir, write_lower
from shim_hooks.snapshotter.model import RemoteImage
from shim_hooks.snapshotter.store import Lower, MetaStore

log = logging.getLogger("shim_hooks.snapshotter.lowers")

_INSTANCE = re.compile(r"[^A-Za-z0-9_.-]")


def volume_key(instance: str, image: RemoteImage) -> str:
    """The IPU's key for this host's lower of ``image``: [A-Za-z0-9_.-], at most 128."""
    name = _INSTANCE.sub("-", instance)[:32] or "host"
    return f"snap-{name}-{image.manifest.partition(':')[2][:64]}-{image.layers}"


def is_mountpoint(path: Path) -> bool:
    """Something is mounted at ``path`` (its device differs from its parent's: two stats,
    where a mount table scan grows with every container on the host)."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except FileNotFoundError:
        return False


def chain_image(image: RemoteImage) -> ChainImage:
    return ChainImage(image.reference, image.manifest, image.layers, image.total)


class Lowers:
    def __init__(self, root: Path, store: MetaStore, address: str, instance: str, *,
                 timeout: float = 600.0) -> None:
        self.root = root
        self.store = store
        self.address = address
        self.instance = instance
        self.timeout = timeout
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    def mountpoint(self, lower_id: int) -> Path:
        return lower_dir(self.root, lower_id) / "fs"

    @contextlib.asynccontextmanager
    async def _locked(self, image: RemoteImage) -> AsyncIterator[None]:
        lock = self._locks.setdefault((image.manifest, image.layers), asyncio.Lock())
        async with lock:
            yield

    @contextlib.asynccontextmanager
    async def hold(self, image: RemoteImage) -> AsyncIterator[Lower]:
        """The lower of ``image``, locked while the caller records the snapshot that will use
        it (so that no release can slip in between); :meth:`ensure` mounts it."""
        async with self._locked(image):
            yield await asyncio.to_thread(self.store.lower_for, image,
                                          volume_key(self.instance, image))

    def mounted(self, lower: Lower) -> bool:
        """Mounted as recorded: a new lower, or one a reboot or an operator unmounted, must
        not be stacked on, or the overlay would show an empty root."""
        return lower.state == "mounted" and is_mountpoint(self.mountpoint(lower.id))

    async def ensure(self, lower: Lower) -> Lower:
        """Mount ``lower`` (held by the caller) if it is not mounted; idempotent."""
        if self.mounted(lower):
            return lower
        return await self._materialize(lower)

    async def _materialize(self, lower: Lower) -> Lower:
        t0 = time.monotonic()
        image = lower.image
        target = self.mountpoint(lower.id)
        await asyncio.to_thread(self._make_dirs, lower)
        prepared = await ipu.prepare(
            self.address, lower.volume, image.reference, "host-block",
            {"kata-ipu.snapshotter/lower": str(lower.id),
             "kata-ipu.snapshotter/instance": self.instance},
            self.timeout, layers=0 if image.whole else image.layers, read_only=True)
        options = tuple(o for o in prepared.options if o not in ("rw", "ro"))
        options = ("ro", *options, *(("noload",) if prepared.fstype == "ext4" else ()))
        try:
            await asyncio.to_thread(self._mount, prepared.path, target, prepared.fstype,
                                    options)
        except BaseException:
            await self._drop_volume(lower)
            raise
        await asyncio.to_thread(self.store.set_lower, lower.id, "mounted", prepared.path,
                                prepared.fstype, options)
        log.info("lower mounted", extra={"lower": lower.id, "image": image.reference,
                                         "layers": image.layers, "device": prepared.path,
                                         "cold": prepared.cold,
                                         "seconds": round(time.monotonic() - t0, 4)})
        got = await asyncio.to_thread(self.store.get_lower, lower.id)
        assert got is not None
        return got

    def _make_dirs(self, lower: Lower) -> None:
        directory = lower_dir(self.root, lower.id)
        (directory / "fs").mkdir(parents=True, exist_ok=True, mode=0o755)
        write_lower(directory, chain_image(lower.image))

    @staticmethod
    def _mount(device: str, target: Path, fstype: str, options: tuple[str, ...]) -> None:
        try:
            st = os.stat(device)
        except OSError as exc:
            raise FailedPrecondition(f"the IPU exported {device}, which is not on this host "
                                     f"({exc.strerror}): its lowers need a host block device "
                                     "(a kata-ipud on this machine, or an IPU's VF)") from exc
        if not stat.S_ISBLK(st.st_mode):
            raise FailedPrecondition(f"the IPU exported {device}, not a block device")
        if mount_source(target) is None:
            hostmount.mount(device, target, fstype, options)

    async def _drop_volume(self, lower: Lower) -> None:
        try:
            await ipu.release(self.address, lower.volume)
        except KataIpuError as exc:
            log.warning("lower %s: its IPU clone %s was not released: %s", lower.id,
                        lower.volume, exc)

    async def release_unused(self, lower_id: int) -> None:
        """Unmount and release the lower if no snapshot stacks on it any more. An IPU that
        cannot be reached leaves it RELEASING, for :meth:`recover` to finish."""
        lower = await asyncio.to_thread(self.store.get_lower, lower_id)
        if lower is None:
            return
        async with self._locked(lower.image):
            if await asyncio.to_thread(self.store.claim_release, lower_id) is None:
                return  # in use again
            await asyncio.to_thread(hostmount.umount, self.mountpoint(lower_id))
            try:
                await ipu.release(self.address, lower.volume)
            except KataIpuError as exc:
                log.warning("lower %s unmounted, but its IPU clone %s was not released (kept "
                            "for the next start): %s", lower_id, lower.volume, exc)
                return
            await asyncio.to_thread(self._forget, lower_id)
            log.info("lower released", extra={"lower": lower_id,
                                              "image": lower.image.reference})

    def _directories(self) -> list[Path]:
        top = self.root / "lowers"
        return [d for d in top.iterdir() if d.name.isdigit()] if top.is_dir() else []

    def _forget(self, lower_id: int) -> None:
        shutil.rmtree(lower_dir(self.root, lower_id), ignore_errors=True)
        self.store.delete_lower(lower_id)

    async def recover(self, users: Callable[[int], int]) -> list[str]:
        """After a restart: mount again what snapshots use, release the rest, unmount what
        no row knows. Returns what was done (also logged)."""
        done: list[str] = []
        known = set()
        for lower in await asyncio.to_thread(self.store.lowers):
            known.add(str(self.mountpoint(lower.id)))
            if users(lower.id):
                try:
                    async with self._locked(lower.image):
                        await self.ensure(lower)
                except KataIpuError as exc:  # the next Mounts/Prepare tries again
                    done.append(f"lower {lower.id} not mounted: {exc}")
                    continue
                if lower.state != "mounted":
                    done.append(f"mounted lower {lower.id} of {lower.image.reference}")
            else:
                await self.release_unused(lower.id)
                done.append(f"released unused lower {lower.id} of {lower.image.reference}")
        for mountpoint in await asyncio.to_thread(mounts_under, self.root / "lowers"):
            if mountpoint not in known:
                await asyncio.to_thread(hostmount.umount, mountpoint)
                done.append(f"unmounted stray {mountpoint}")
        rows = {lower.id for lower in await asyncio.to_thread(self.store.lowers)}
        for directory in await asyncio.to_thread(self._directories):
            if int(directory.name) not in rows and mount_source(directory / "fs") is None:
                await asyncio.to_thread(shutil.rmtree, directory, True)
                done.append(f"removed stray {directory}")
        for line in done:
            log.warning("recovery: %s", line)
        return done
