"""A reflink-capable pool for a state directory that is not: a sparse file formatted
``mkfs.xfs -m reflink=1`` and loop-mounted (the seed's ``dd`` + ``bdev_aio_create`` +
``bdev_lvol_create_lvstore``).

Lifecycle: :func:`create` (once) → :func:`mount` (idempotent, after every boot or crash) →
:func:`unmount` (tolerant of a pool already unmounted or a loop already gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from kata_ipu.block import loop
from kata_ipu.executor import DEFAULT, Executor
from kata_ipu.osutil import mountinfo

log = logging.getLogger("kata_ipu.block")

MIN_SIZE = 512 << 20  # mkfs.xfs refuses filesystems under 300 MB


def create(image: Path, size: int, executor: Executor = DEFAULT) -> None:
    """Create the sparse pool file and its XFS filesystem (refuses to overwrite)."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, max(size, MIN_SIZE))
    finally:
        os.close(fd)
    try:
        executor.run(["mkfs.xfs", "-q", "-m", "reflink=1", "-L", "kataipu-pool", str(image)],
                     timeout=120)
    except BaseException:
        image.unlink()
        raise


def mount(image: Path, mountpoint: Path, executor: Executor = DEFAULT) -> None:
    """Loop-mount the pool at ``mountpoint`` unless it already is."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    current = mountinfo.mount_source(mountpoint)
    if current is not None:
        source, fstype = current
        minors = loop.find(image)
        if fstype == "xfs" and any(source == f"/dev/loop{m}" for m in minors):
            return
        raise RuntimeError(f"{mountpoint} already has {source} ({fstype}) mounted")
    dev = loop.attach(image, direct_io=True, name=f"kata-ipu-pool:{image}")
    try:
        executor.run(["mount", "-t", "xfs", "-o", "noatime", dev.path, str(mountpoint)],
                     timeout=60)
    except BaseException:
        loop.detach(dev.minor, image)
        raise
    log.info("pool mounted", extra={"image": str(image), "loop": dev.path,
                                    "mountpoint": str(mountpoint)})


def unmount(image: Path, mountpoint: Path, executor: Executor = DEFAULT) -> None:
    """Unmount the pool and detach its loop devices (each step tolerates being done already)."""
    current = mountinfo.mount_source(mountpoint)
    if current is not None:
        executor.run(["umount", str(mountpoint)], timeout=60)
    with contextlib.suppress(FileNotFoundError):
        loop.detach_all(image)
