"""A throwaway QEMU TCG guest for VM tests: a cached Debian cloud kernel, a busybox initramfs,
and a launcher with QMP, memfd shared memory (vhost-user needs it) and serial capture.

Everything is built at test time when missing and cached OUTSIDE the repository (default
``/var/cache/kata-ipu-tests/guest``, override with ``KATA_IPU_TEST_CACHE``):

* :func:`kernel` — ``apt-get download linux-image-<abi>-cloud-amd64`` + ``dpkg-deb -x``;
  the ABI is resolved through ``apt-cache depends linux-image-cloud-amd64``.
* :func:`initramfs` — busybox-static, an ``/init`` script, and the closure of the requested
  modules (dependencies read from each ``.ko``'s ``depends=`` modinfo, loaded with ``insmod``
  in order: no depmod needed), written as a ``newc`` cpio in Python (no cpio binary needed).
* :class:`Guest` — ``qemu-system-x86_64 -accel tcg`` (never KVM: it crashes guests on this
  machine class) on q35 with hot-pluggable root ports, in its own process group.

The default ``/init`` (:data:`DISK_PROBE_INIT`) prints ``GUEST-READY``, then for every
virtio disk that appears mounts it, prints each top-level ``*.txt`` file, writes
``guest-wrote.txt``, unmounts it, and reports removals; see the markers in the script.

Nothing runs at import time.

Size (~400 lines): kernel, initramfs and the QEMU launcher are the one guest recipe, cached
together; the Kata-like image and driver are guestimage.py and vmdriver.py.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kata_ipu.block.qsd import QmpLink
from kata_ipu.executor import DEFAULT, CommandFailed, Executor
from tests.support.cache import cache_dir as test_cache_dir
from tests.support.cache import locked

META_PACKAGE = "linux-image-cloud-amd64"

DISK_PROBE_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do insmod /lib/modules/$m.ko || echo "GUEST-INSMOD-FAILED $m"; done
echo "GUEST-READY kernel=$(uname -r)"
seen=""
while :; do
  for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    n=${d##*/}
    case " $seen " in *" $n "*) continue;; esac
    seen="$seen $n"
    echo "GUEST-DISK-ADDED $n serial=$(cat $d/serial 2>/dev/null)"
    i=0; while [ ! -b /dev/$n ] && [ $i -lt 50 ]; do usleep 20000; i=$((i+1)); done
    mkdir -p /mnt/$n
    if mount /dev/$n /mnt/$n 2>/tmp/mnt.err; then
      for f in /mnt/$n/*.txt; do
        [ -f "$f" ] && echo "GUEST-FILE $n ${f##*/} $(head -c 200 $f | tr '\n' ' ')"
      done
      echo "written by the guest on $n" > /mnt/$n/guest-wrote.txt && sync && echo "GUEST-WROTE $n"
      umount /mnt/$n && echo "GUEST-UNMOUNTED $n"
    else
      echo "GUEST-MOUNT-FAILED $n $(cat /tmp/mnt.err)"
    fi
    echo "GUEST-DISK-DONE $n"
  done
  for n in $seen; do
    if [ ! -e /sys/block/$n ]; then
      echo "GUEST-DISK-REMOVED $n"
      new=""; for x in $seen; do [ "$x" = "$n" ] || new="$new $x"; done; seen="$new"
    fi
  done
  usleep 100000
done
"""


def cache_dir() -> Path:
    return test_cache_dir("guest")


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[Path]:
    base = cache_dir()
    with locked(base / f".{name}.lock"):
        yield base


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path  # lib/modules/<version>


def _resolve_package(executor: Executor) -> str:
    out = executor.run(["apt-cache", "depends", META_PACKAGE], timeout=60).text
    m = re.search(r"Depends: (linux-image-\S+-cloud-amd64)", out)
    if m is None:
        raise RuntimeError(f"cannot resolve {META_PACKAGE}: {out.strip()!r}")
    return m.group(1)


def kernel(executor: Executor = DEFAULT) -> Kernel:
    """The Debian cloud kernel, downloaded and unpacked once."""
    with _cache_lock("kernel") as base:
        for tree in sorted(base.glob("kernel-*")):
            found = _kernel_in(tree)
            if found is not None:
                return found
        try:
            package = _resolve_package(executor)
        except (CommandFailed, RuntimeError):
            executor.run(["apt-get", "update", "-q"], timeout=600)
            package = _resolve_package(executor)
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            try:
                executor.run(["apt-get", "download", "-q", package], cwd=tmp, timeout=600)
            except CommandFailed:
                executor.run(["apt-get", "update", "-q"], timeout=600)
                executor.run(["apt-get", "download", "-q", package], cwd=tmp, timeout=600)
            deb = next(Path(tmp).glob("*.deb"))
            tree = Path(tmp) / "tree"
            executor.run(["dpkg-deb", "-x", str(deb), str(tree)], timeout=600)
            version = package.removeprefix("linux-image-")
            final = base / f"kernel-{version}"
            tree.rename(final)
        found = _kernel_in(final)
        if found is None:
            raise RuntimeError(f"{package} has no vmlinuz/modules")
        return found


def _kernel_in(tree: Path) -> Kernel | None:
    vmlinuz = sorted(tree.glob("boot/vmlinuz-*"))
    if not vmlinuz:
        return None
    version = vmlinuz[0].name.removeprefix("vmlinuz-")
    modules = tree / "lib/modules" / version
    return Kernel(version, vmlinuz[0], modules) if modules.is_dir() else None


def _module_index(k: Kernel) -> dict[str, Path]:
    return {p.name[:-3].replace("-", "_"): p for p in (k.modules / "kernel").rglob("*.ko")}


def _depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    if m is None or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def module_closure(k: Kernel, wanted: Sequence[str]) -> list[Path]:
    """``wanted`` modules and their dependencies, dependencies first."""
    index = _module_index(k)
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order:
            return
        if name not in index:
            raise RuntimeError(f"module {name} not in {k.modules}")
        for dep in _depends(index[name]):
            if dep not in stack:
                visit(dep, (*stack, name))
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return [index[n] for n in order]


class _Cpio:
    """A minimal ``newc`` cpio writer."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.buf.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.buf.getvalue()


def initramfs(k: Kernel, *, init: str = DISK_PROBE_INIT,
              modules: Sequence[str] = ("virtio_pci", "virtio_blk"),
              files: Mapping[str, bytes] | None = None, prefix: str = "initramfs") -> Path:
    """A gzip'd busybox initramfs with ``init`` as /init, the ``modules`` closure in
    /lib/modules and ``files`` (``{path: content}``, parents created) added; cached by
    content as ``<prefix>-<hash>.cpio.gz``."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    closure = module_closure(k, modules)
    script = init.replace("@MODULES@", " ".join(p.name[:-3] for p in closure))
    extra = dict(files or {})
    key = hashlib.sha256()
    key.update(busybox.read_bytes())
    for text in (k.version, script, *(p.name for p in closure)):
        key.update(text.encode() + b"\0")
    for rel, data in sorted(extra.items()):
        key.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    with _cache_lock("initramfs") as base:
        out = base / f"{prefix}-{key.hexdigest()[:16]}.cpio.gz"
        if out.exists():
            return out
        cpio = _Cpio()
        dirs = {"bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"}
        for d in sorted(dirs):
            cpio.add(d, stat.S_IFDIR | 0o755)
        cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        cpio.add("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
        cpio.add("init", stat.S_IFREG | 0o755, script.encode())
        for ko in closure:
            cpio.add(f"lib/modules/{ko.name}", stat.S_IFREG | 0o644, ko.read_bytes())
        for rel, data in sorted(extra.items()):
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    cpio.add(d, stat.S_IFDIR | 0o755)
            cpio.add(rel, stat.S_IFREG | 0o644, data)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=1, mtime=0))
        tmp.rename(out)
        return out


class Serial:
    """Lines from the guest console, collected by a thread; :meth:`wait` for a pattern."""

    def __init__(self, stream: io.BufferedReader) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: io.BufferedReader) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<eof>")
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        pos = since
        with self._cond:
            while True:
                for i in range(pos, len(self.lines)):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                    if self.lines[i] == "<eof>":
                        raise RuntimeError(f"guest exited before {pattern!r}:\n{self.text()}")
                pos = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {pattern!r} within {timeout:g}s:\n{self.text()}")
                self._cond.wait(left)

    def text(self) -> str:
        return "\n".join(self.lines[-60:])


class Guest:
    """``with Guest(workdir) as g: g.qmp.execute(...); g.serial.wait(...)``.

    q35 with ``root_ports`` hot-pluggable PCIe root ports (``rp1``...), 1 vCPU, ``memory``
    MiB of memfd-backed shared RAM (vhost-user backends map it), TCG only.
    """

    def __init__(self, workdir: Path, *, memory: int = 512, root_ports: int = 3,
                 init: str = DISK_PROBE_INIT, modules: Sequence[str] = ("virtio_pci",
                                                                        "virtio_blk"),
                 boot_timeout: float = 120.0, executor: Executor = DEFAULT) -> None:
        self.workdir = workdir
        self.memory = memory
        self.root_ports = root_ports
        self.init = init
        self.modules = modules
        self.boot_timeout = boot_timeout
        self.executor = executor
        self.qmp_sock = workdir / "qmp.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QmpLink | None = None
        self._serial: Serial | None = None

    @property
    def qmp(self) -> QmpLink:
        assert self._qmp is not None, "guest not started"
        return self._qmp

    @property
    def serial(self) -> Serial:
        assert self._serial is not None, "guest not started"
        return self._serial

    def argv(self, k: Kernel, initrd: Path) -> list[str]:
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", str(self.memory),
            "-smp", "1", "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(k.vmlinuz), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-object", f"memory-backend-memfd,id=mem,size={self.memory}M,share=on",
            "-numa", "node,memdev=mem",
        ]
        for i in range(1, self.root_ports + 1):
            argv += ["-device", f"pcie-root-port,id=rp{i},chassis=1,slot={i}"]
        return argv

    def start(self) -> Guest:
        k = kernel(self.executor)
        initrd = initramfs(k, init=self.init, modules=self.modules)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.qmp_sock.unlink()
        self.proc = subprocess.Popen(self.argv(k, initrd), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        self._serial = Serial(self.proc.stdout)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while not self.qmp_sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu did not start:\n{self._serial.text()}")
            time.sleep(0.01)
        self._qmp = QmpLink(self.qmp_sock, name="guest")
        self._qmp.connect()
        self._serial.wait(r"GUEST-READY", self.boot_timeout)
        return self

    def stop(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.execute("quit", timeout=5)
            self._qmp.close()
            self._qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.qmp_sock.unlink()

    def __enter__(self) -> Guest:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- hot-plug helpers ----------------------------------------------------------------

    def hotplug_vhost_user_blk(self, socket: str, dev_id: str, bus: str) -> None:
        self.qmp.execute("chardev-add", {"id": f"{dev_id}-chr", "backend": {
            "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": socket}},
                                       "server": False}}})
        self.qmp.execute("device_add", {"driver": "vhost-user-blk-pci", "id": dev_id,
                                        "chardev": f"{dev_id}-chr", "bus": bus})

    def unplug(self, dev_id: str, chardev: str | None = None, timeout: float = 60.0) -> None:
        self.qmp.execute_wait_event("device_del", {"id": dev_id}, "DEVICE_DELETED",
                                    {"device": dev_id}, timeout)
        if chardev:
            self.qmp.execute("chardev-remove", {"id": chardev})
