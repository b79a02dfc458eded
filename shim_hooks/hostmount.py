"""Mounting an IPU block device as a container's root on the host, and warming it.

Used by the shim proxy (runc delegate: it mounts the device at ``<bundle>/rootfs`` while the
delegate shim starts, instead of leaving the mount to ``Create``) and by ``kata-ipu-runtime``.
Mounts are ``mount(2)``/``umount2(2)`` calls, not the ``mount`` program: these run on a
container's start path. Unmounting is idempotent and falls back to a lazy detach when the
mount is busy.

:func:`prefetch_entrypoint` starts the kernel's read-ahead of the container's first program
(and its ELF interpreter): a fresh clone's filesystem has a cold page cache, and the first
``exec`` otherwise waits for those reads.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("shim_hooks.hostmount")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
          "sync": MS_SYNCHRONOUS, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
          "relatime": MS_RELATIME, "rw": 0}
MAX_SYMLINKS = 40


@functools.cache
def libc() -> ctypes.CDLL:
    """``mount``/``umount2`` of the C library this interpreter runs on (its global symbols).

    Not ``ctypes.util.find_library("c")``: that runs ``/sbin/ldconfig -p`` and parses its
    output — a fork, an exec and a millisecond or two of CPU holding the GIL, on every
    container's start path (kata-ipu-shimd calls this once, before it forks spares).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


class MountError(OSError):
    """A mount or unmount failed; the message names the device and the target."""


def split_options(options: Sequence[str]) -> tuple[int, str]:
    """mount(8)-style options as ``mount(2)`` flags and the filesystem's data string."""
    flags, data = 0, []
    for opt in options:
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        elif opt:
            data.append(opt)
    return flags, ",".join(data)


def mount(device: str, target: str | os.PathLike[str], fstype: str,
          options: Sequence[str] = ()) -> None:
    flags, data = split_options(options)
    if libc().mount(device.encode(), os.fsencode(target), fstype.encode(), flags,
                  data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount {fstype} {device} on {target} failed: "
                              f"{os.strerror(err)}")


def mount_clone(device: str, target: str | os.PathLike[str], fstype: str,
                options: Sequence[str] = ()) -> None:
    """Mount an IPU clone as a container's root: :func:`mount`, and for ext4 without loading
    its journal (``noload``).

    Why without a journal: a clone lives exactly as long as its container's task and is
    thrown away after it (a restarted task gets a new clone), so there is nothing a journal
    could recover after a crash; loading it costs a journal read and a new ``jbd2`` kernel
    thread on every container start — on a busy 2-CPU host about half of the mount's time
    (docs/benchmarks.md). ext4 refuses ``noload`` read-write when the journal needs recovery
    (a clone in use when the host crashed, prepared again for the same container): then it is
    mounted with its journal, which recovers it.
    """
    if fstype == "ext4" and "noload" not in options:
        try:
            mount(device, target, fstype, (*options, "noload"))
            return
        except MountError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info("mounting %s with its journal (it needs recovery)", device)
    mount(device, target, fstype, options)


def umount(target: str | os.PathLike[str]) -> bool:
    """Unmount ``target`` if it is a mount point (busy: detach lazily); True if it was."""
    from kata_ipu.osutil.mountinfo import mount_source  # noqa: PLC0415 - not on a start path

    if mount_source(target) is None:
        return False
    path = os.fsencode(target)
    if libc().umount2(path, 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # raced with another unmount
            return False
        if err != errno.EBUSY or libc().umount2(path, MNT_DETACH) != 0:
            err = ctypes.get_errno() or err
            raise MountError(err, f"umount {target} failed: {os.strerror(err)}")
        log.warning("rootfs busy, detached lazily", extra={"target": str(target)})
    return True


def resolve_in_root(root: Path, path: str) -> Path | None:
    """``path`` as the container will see it, resolved without leaving ``root`` (symlinks
    followed as the container's kernel would: absolute targets start again at ``root``, and
    ``..`` stops there). None when it does not exist or loops."""
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            target = os.readlink(candidate)
        except FileNotFoundError:
            return None
        except OSError:  # not a symlink
            resolved.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            return None
        if target.startswith("/"):
            resolved = []
        parts = [p for p in target.split("/") if p and p != "."] + parts
    result = root.joinpath(*resolved)
    return result if result.exists() else None


def _elf_interpreter(fd: int) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF (the dynamic loader), if any."""
    head = os.pread(fd, 64, 0)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    table = os.pread(fd, phentsize * min(phnum, 64), phoff)
    for i in range(len(table) // phentsize if phentsize else 0):
        ptype, = struct.unpack_from("<I", table, i * phentsize)
        if ptype == 3:  # PT_INTERP
            offset, = struct.unpack_from("<Q", table, i * phentsize + 8)
            size, = struct.unpack_from("<Q", table, i * phentsize + 32)
            return os.pread(fd, min(size, 4096), offset).rstrip(b"\0").decode(
                errors="replace")
    return None


def _command(spec: dict[str, Any]) -> tuple[str, str]:
    process = spec.get("process") or {}
    args = process.get("args") or []
    env = process.get("env") or []
    path = next((e[5:] for e in env if isinstance(e, str) and e.startswith("PATH=")),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return (str(args[0]) if args else ""), path


def prefetch_entrypoint(root: Path, spec: dict[str, Any]) -> list[Path]:
    """Start read-ahead (``POSIX_FADV_WILLNEED``) of the spec's program and its ELF
    interpreter inside ``root``; returns what it asked for. Never raises: it is an
    optimisation."""
    program, search = _command(spec)
    if not program:
        return []
    candidates = [program] if "/" in program else [f"{d}/{program}" for d in
                                                   search.split(":") if d]
    done: list[Path] = []
    try:
        for cand in candidates:
            found = resolve_in_root(root, cand)
            if found is None or not found.is_file():
                continue
            interp = _willneed(found)
            done.append(found)
            if interp:
                loader = resolve_in_root(root, interp)
                if loader is not None and loader.is_file():
                    _willneed(loader)
                    done.append(loader)
            break
    except OSError as exc:
        log.debug("prefetch of %s failed: %s", program, exc)
    return done


def _elf_interpreter_of(path: Path) -> str | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _elf_interpreter(fd)
    finally:
        os.close(fd)


def _willneed(path: Path) -> str | None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return _elf_interpreter(fd)
    finally:
        os.close(fd)
