"""Mount a found disk as a container root: ext4 read-write, or a read-only filesystem (erofs,
or any read-only disk) under a tmpfs-backed overlay so the container can still write.

Checks before mounting, each with its own error: the target must not already be a mount point
and the disk must not be mounted anywhere (:class:`AlreadyMounted`); the superblock must hold
the expected filesystem (:class:`WrongFilesystem`); ext4 is checked with ``e2fsck -p`` when it
will be mounted read-write (:class:`FsckFailed` on uncorrected errors). mount(2) is called
directly through libc (no fork/exec of ``mount`` on the hot path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass

from guest_hooks.errors import (
    AlreadyMounted,
    FsckFailed,
    InvalidArgument,
    MountFailed,
    WrongFilesystem,
)

MS_RDONLY = 1
MNT_DETACH = 2
STATE_DIR = "/run/kata-ipu/rootfs"
SUPPORTED = ("ext4", "erofs", "xfs")


@dataclass(frozen=True)
class Mounted:
    device: str
    target: str
    fstype: str
    readonly_lower: str | None  # the read-only lower mount under an overlay, if any
    fsck_seconds: float = 0.0


def detect_fstype(device: str) -> str | None:
    """The filesystem in a superblock: ext2/3/4 (reported as ``ext4``), erofs or xfs."""
    try:
        with open(device, "rb") as f:
            head = f.read(2048)
    except OSError as exc:
        raise MountFailed(f"cannot read {device}: {exc.strerror}", exc.errno or 0) from exc
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "ext4"
    if len(head) >= 1028 and head[1024:1028] == b"\xe2\xe1\xf5\xe0":
        return "erofs"
    if head[:4] == b"XFSB":
        return "xfs"
    return None


def mountpoints(mounts_file: str = "/proc/self/mounts") -> list[tuple[str, str, str]]:
    """``(source, target, fstype)`` of every mount, octal escapes decoded."""
    out: list[tuple[str, str, str]] = []
    with open(mounts_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return out


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def sys_mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    rc = _libc().mount(source.encode(), target.encode(), fstype.encode(), flags,
                       data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        if err == errno_mod.EBUSY:
            raise AlreadyMounted(f"mount {source} on {target}: {os.strerror(err)}")
        raise MountFailed(f"mount -t {fstype} {source} {target} ({data or 'no options'}): "
                          f"{os.strerror(err)}", err)


def sys_umount(target: str, flags: int = 0) -> None:
    rc = _libc().umount2(target.encode(), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountFailed(f"umount {target}: {os.strerror(err)}", err)


def _fsck(device: str) -> None:
    proc = subprocess.run(["e2fsck", "-p", device], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode >= 4:  # 0 clean, 1 fixed, 2 fixed + reboot; 4+ uncorrected/operational
        raise FsckFailed(device, proc.returncode, proc.stdout + proc.stderr)


def _state_dir(target: str) -> str:
    return os.path.join(STATE_DIR, hashlib.sha256(target.encode()).hexdigest()[:16])


def mount_rootfs(device: str, target: str, fstype: str, *, readonly: bool = False,
                 options: tuple[str, ...] = (), fsck: bool = True) -> Mounted:
    """Mount ``device`` at ``target`` as a container root.

    ``readonly`` (or an erofs ``fstype``) mounts the disk read-only under an overlay whose
    upper layer is on the guest's tmpfs ``/run``.
    """
    if fstype not in SUPPORTED:
        raise InvalidArgument(f"unsupported fstype {fstype!r} (supported: {', '.join(SUPPORTED)})")
    target = os.path.abspath(target)
    real_dev = os.path.realpath(device)
    for source, where, _fs in mountpoints():
        if where == target:
            raise AlreadyMounted(f"{target} is already a mount point (of {source})")
        if source in (device, real_dev):
            raise AlreadyMounted(f"{device} is already mounted at {where}")
    found = detect_fstype(real_dev)
    if found != fstype:
        raise WrongFilesystem(device, fstype, found)
    os.makedirs(target, exist_ok=True)
    opts = ",".join(options)
    if fstype == "erofs":
        readonly = True
    if not readonly:
        checked = time.monotonic()
        if fstype == "ext4" and fsck:
            _fsck(real_dev)
        checked = time.monotonic() - checked
        sys_mount(real_dev, target, fstype, 0, opts)
        return Mounted(device, target, fstype, None, checked)
    state = _state_dir(target)
    lower, upper_fs = os.path.join(state, "lower"), os.path.join(state, "rw")
    os.makedirs(lower, exist_ok=True)
    os.makedirs(upper_fs, exist_ok=True)
    ro_opts = ",".join(o for o in (opts, "noload" if fstype == "ext4" else "") if o)
    sys_mount(real_dev, lower, fstype, MS_RDONLY, ro_opts)
    try:
        os.makedirs(os.path.join(upper_fs, "upper"), exist_ok=True)
        os.makedirs(os.path.join(upper_fs, "work"), exist_ok=True)
        sys_mount("overlay", target, "overlay", 0,
                  f"lowerdir={lower},upperdir={upper_fs}/upper,workdir={upper_fs}/work")
    except BaseException:
        sys_umount(lower, MNT_DETACH)
        raise
    return Mounted(device, target, fstype, lower)


def umount_rootfs(target: str) -> bool:
    """Unmount what :func:`mount_rootfs` mounted at ``target``; False if nothing was mounted.

    Works after a surprise removal of the disk: a busy or dead mount is detached lazily.
    """
    target = os.path.abspath(target)
    if not any(where == target for _s, where, _f in mountpoints()):
        return False
    try:
        sys_umount(target)
    except MountFailed as exc:
        if exc.errno not in (errno_mod.EBUSY, errno_mod.EIO):
            raise
        sys_umount(target, MNT_DETACH)
    lower = os.path.join(_state_dir(target), "lower")
    if any(where == lower for _s, where, _f in mountpoints()):
        try:
            sys_umount(lower)
        except MountFailed:
            sys_umount(lower, MNT_DETACH)
    return True
