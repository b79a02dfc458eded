"""Loop devices and mounts, with teardown that always runs (no leaked mounts or loop devices).

``losetup``/``mount``/``umount`` go through the injected :class:`~kata_ipu.executor.Executor`.
Teardown is tolerant (os-brick's habit): it tries every step, logs each failure, and raises the
first one only after all steps ran.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from kata_ipu.executor import DEFAULT, Executor

log = logging.getLogger("kata_ipu.rootfs")


def attach_loop(image: str | os.PathLike[str], *, read_only: bool,
                executor: Executor = DEFAULT) -> str:
    argv = ["losetup", "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    argv.append(str(image))
    return executor.run(argv).text.strip()


def detach_loop(device: str, *, executor: Executor = DEFAULT) -> None:
    executor.run(["losetup", "--detach", device])


@contextlib.contextmanager
def mounted(image: str | os.PathLike[str], target: str | os.PathLike[str], *, fstype: str,
            read_only: bool = True, options: str = "",
            executor: Executor = DEFAULT) -> Iterator[Path]:
    """Attach ``image`` to a loop device and mount it at ``target`` for the ``with`` body."""
    device = attach_loop(image, read_only=read_only, executor=executor)
    mounted_ok = False
    try:
        opts = ",".join(o for o in ("ro" if read_only else "rw", options) if o)
        executor.run(["mount", "-t", fstype, "-o", opts, device, str(target)])
        mounted_ok = True
        yield Path(target)
    finally:
        first: BaseException | None = None
        if mounted_ok:
            try:
                executor.run(["umount", str(target)])
            except Exception as exc:
                log.error("umount failed", extra={"target": str(target)}, exc_info=True)
                first = exc
        try:
            detach_loop(device, executor=executor)
        except Exception as exc:
            log.error("loop detach failed", extra={"device": device}, exc_info=True)
            first = first or exc
        if first is not None:
            raise first
