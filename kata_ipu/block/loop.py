"""Loop devices through ioctls: ``LOOP_CTL_GET_FREE`` + ``LOOP_CONFIGURE`` to attach,
``LOOP_CLR_FD`` to detach, sysfs to find which loop serves which file.

Other programs create and remove loop devices concurrently, so attaching retries when the
free device it was given is taken first (``EBUSY``), and detaching first checks that the device
still serves the expected file: this module never detaches a loop it cannot prove is ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kata_ipu.block.errors import NoFreeLoop

log = logging.getLogger("kata_ipu.block")

LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
BLKGETSIZE64 = 0x80081272

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
LOOP_MAJOR = 7


class LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


@dataclass(frozen=True, slots=True)
class Loop:
    path: str
    major: int
    minor: int
    size: int


def backing_file(minor: int) -> str | None:
    """The file loop ``minor`` serves, as the kernel reports it, or None if unattached."""
    try:
        text = Path(f"/sys/block/loop{minor}/loop/backing_file").read_text()
    except (FileNotFoundError, OSError):
        return None
    return text.rstrip("\n")


def find(file: str | os.PathLike[str]) -> list[int]:
    """Minors of every loop device serving ``file`` (compared by resolved path)."""
    want = os.path.realpath(file)
    out = []
    for entry in os.listdir("/sys/block"):
        if entry.startswith("loop") and entry[4:].isdigit():
            served = backing_file(int(entry[4:]))
            if served is not None and served.removesuffix(" (deleted)") == want:
                out.append(int(entry[4:]))
    return sorted(out)


def find_under(directory: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(minor, file) of every loop device serving a file inside ``directory`` (deleted files
    included: the kernel still names them)."""
    prefix = os.path.realpath(directory) + "/"
    out = []
    for entry in os.listdir("/sys/block"):
        if entry.startswith("loop") and entry[4:].isdigit():
            served = backing_file(int(entry[4:]))
            if served is not None and served.startswith(prefix):
                out.append((int(entry[4:]), served.removesuffix(" (deleted)")))
    return sorted(out)


def _describe(minor: int) -> Loop:
    path = f"/dev/loop{minor}"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = ctypes.c_uint64()
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
        rdev = os.fstat(fd).st_rdev
    finally:
        os.close(fd)
    return Loop(path, os.major(rdev), os.minor(rdev), buf.value)


def describe(minor: int) -> Loop:
    return _describe(minor)


def _loop_node(minor: int) -> str:
    path = f"/dev/loop{minor}"
    if not os.path.exists(path):
        # devtmpfs normally creates it; containers without udev may not
        with contextlib.suppress(FileExistsError):
            os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, minor))
    return path


def attach(file: str | os.PathLike[str], *, read_only: bool = False, direct_io: bool = True,
           block_size: int = 512, name: str = "", attempts: int = 64) -> Loop:
    """Attach ``file`` to a free loop device with ``LOOP_CONFIGURE`` (autoclear off).

    The kernel only keeps ``direct_io`` when ``block_size`` is a multiple of the backing
    file's direct-I/O alignment (4 KiB for reflinked XFS files); otherwise the device
    silently uses buffered I/O.
    """
    flags = os.O_RDONLY if read_only else os.O_RDWR
    backing = os.open(file, flags | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(attempts):
                minor = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                if _configure(minor, backing, read_only, direct_io, block_size, name):
                    loop = _describe(minor)
                    log.debug("loop attached", extra={"loop": loop.path, "file": str(file)})
                    return loop
        finally:
            os.close(ctl)
    finally:
        os.close(backing)
    raise NoFreeLoop()


def _configure(minor: int, backing: int, read_only: bool, direct_io: bool, block_size: int,
               name: str) -> bool:
    cfg = LoopConfig()
    cfg.fd = backing
    cfg.block_size = block_size
    cfg.info.lo_flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (
        LO_FLAGS_DIRECT_IO if direct_io else 0)
    raw = name.encode()[: LO_NAME_SIZE - 1]
    ctypes.memmove(cfg.info.lo_file_name, raw, len(raw))
    try:
        dev = os.open(_loop_node(minor), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.ioctl(dev, LOOP_CONFIGURE, cfg)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False  # someone else took this free device first
            if exc.errno == errno.EINVAL and direct_io:
                # the backing filesystem refuses O_DIRECT at this block size: buffered I/O
                cfg.info.lo_flags &= ~LO_FLAGS_DIRECT_IO
                try:
                    fcntl.ioctl(dev, LOOP_CONFIGURE, cfg)
                except OSError as again:
                    if again.errno == errno.EBUSY:
                        return False
                    raise
                return True
            raise
        return True
    finally:
        os.close(dev)


def fs_block_size(image: str | os.PathLike[str]) -> int:
    """Block size of the ext4 or erofs filesystem in ``image`` (512 if unknown): a loop
    device may use a logical block size up to this without breaking the filesystem."""
    with open(image, "rb") as f:
        sb = f.read(2048)[1024:]
    if len(sb) >= 64 and sb[56:58] == b"\x53\xef":  # ext2/3/4: s_magic, s_log_block_size
        return 1024 << int.from_bytes(sb[24:28], "little")
    if len(sb) >= 16 and sb[0:4] == b"\xe2\xe1\xf5\xe0":  # erofs: magic, blkszbits
        return 1 << sb[12]
    return 512


def detach(minor: int, expected_file: str | os.PathLike[str]) -> bool:
    """Detach loop ``minor`` if it still serves ``expected_file``; False if it does not.

    The kernel defers the detach (autoclear) while the device is still open elsewhere.
    """
    served = backing_file(minor)
    if served is None or served.removesuffix(" (deleted)") != os.path.realpath(expected_file):
        return False
    try:
        dev = os.open(f"/dev/loop{minor}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.ioctl(dev, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # already unbound
            return False
        raise
    finally:
        os.close(dev)
    log.debug("loop detached", extra={"loop": f"/dev/loop{minor}", "file": str(expected_file)})
    return True


def detach_all(file: str | os.PathLike[str]) -> int:
    """Detach every loop serving ``file``; returns how many were detached."""
    return sum(detach(minor, file) for minor in find(file))
