"""What a killed build leaves in its build directory, and how the writer removes it.

A writer (:mod:`kata_ipu.rootfs.writers`) works inside the directory of the image it makes:
the partial image ``<name>.img*``, a loop device serving it, a ``.rootfs-mnt-*`` mount point
with the image mounted on it, a ``.rootfs-stage-*`` staging tree. ``writer.abort()`` removes
them after a failure; after a SIGKILL nobody did, and the next start calls
:func:`cleanup_leftovers` on the directory (no build may be running in it)::

    mounts under the directory   ─▶ umount (lazily if busy)
    loop devices serving its files ─▶ detach
    every entry left             ─▶ removed

Each step returns one human-readable line per thing it removed, for the caller's log.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kata_ipu.block import loop
from kata_ipu.executor import DEFAULT, CommandFailed, Executor
from kata_ipu.osutil import mountinfo


def release_devices(directory: Path, *, executor: Executor = DEFAULT) -> list[str]:
    """Unmount and detach what a killed build left mounted or loop-attached under
    ``directory``."""
    done = []
    for mountpoint in mountinfo.mounts_under(directory):
        try:
            executor.run(["umount", mountpoint])
        except CommandFailed:
            executor.run(["umount", "--lazy", mountpoint])
        done.append(f"unmounted partial build {os.path.basename(mountpoint)}")
    for minor, backing in loop.find_under(directory):
        if loop.detach(minor, backing):
            done.append(f"detached /dev/loop{minor} of partial build "
                        f"{os.path.basename(backing)}")
    return done


def cleanup_leftovers(directory: Path, *, executor: Executor = DEFAULT) -> list[str]:
    """Release the devices of, then delete, every partial build in ``directory`` (which
    stays). A directory that does not exist has nothing left in it."""
    if not directory.exists():
        return []
    done = release_devices(directory, executor=executor)
    for leftover in sorted(directory.iterdir()):
        done.append(f"removed partial build {leftover.name}")
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return done
