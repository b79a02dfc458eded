"""``kata-ipu check``: is everything the daemon needs present and working on its machine."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kata_ipu.block import fsutil
from kata_ipu.block.interface import BlockTarget


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def _program(name: str, package: str) -> CheckResult:
    path = shutil.which(name)
    if path:
        return CheckResult(name, True, path)
    return CheckResult(name, False, f"not found on PATH: apt-get install {package}")


def run_checks(root: Path, target: BlockTarget | None) -> list[CheckResult]:
    out: list[CheckResult] = []
    try:
        fd = os.open("/dev/loop-control", os.O_RDWR)
        os.close(fd)
        out.append(CheckResult("loop-control", True, "/dev/loop-control is usable"))
    except OSError as exc:
        out.append(CheckResult("loop-control", False,
                               f"/dev/loop-control: {exc.strerror} (load the loop module, "
                               "run as root)"))
    out.append(CheckResult("state-dir", os.access(root, os.W_OK),
                           f"{root} is writable" if os.access(root, os.W_OK)
                           else f"{root} is not writable by uid {os.getuid()}"))
    if target is not None:
        data = target.pool.data_dir
        if target.pool.backend == "file":
            ok = fsutil.supports_reflink(data)
            out.append(CheckResult("reflink-pool", ok, f"{data} supports FICLONE" if ok else
                                   f"{data} does not support reflink clones"))
        total, _used, free = fsutil.statvfs_space(data)
        ok = free > 0.05 * total
        out.append(CheckResult("pool-space", ok,
                               f"{free >> 20} MiB free of {total >> 20} MiB in {data}"))
    for name, package in (("mkfs.ext4", "e2fsprogs"), ("e2fsck", "e2fsprogs"),
                          ("mkfs.erofs", "erofs-utils"), ("mkfs.xfs", "xfsprogs"),
                          ("qemu-storage-daemon", "qemu-system-common"),
                          ("qemu-img", "qemu-utils")):
        out.append(_program(name, package))
    return out
