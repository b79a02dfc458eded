"""Helpers shared by the block conformance tests: test images and the kernel's view of what a
pool left behind (loop devices, mounts, qemu-storage-daemon processes, files)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from kata_ipu.testing import daemon as testing_daemon


def make_ext4(path: Path, tree: Path, size_mib: int = 64, label: str = "kbtest") -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(tree), str(path),
                    f"{size_mib}M"], check=True)
    return path


def sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def loops_under(*prefixes: Path) -> list[str]:
    """Loop devices (kernel view, sysfs) whose backing file lies under one of ``prefixes``."""
    return [f"{dev}={served}" for p in prefixes
            for dev, served in testing_daemon.loops_under(p).items()]


def losetup_files() -> list[str]:
    """Backing files as ``losetup -J`` reports them (a second, independent view)."""
    out = subprocess.run(["losetup", "-J"], capture_output=True, text=True, check=True).stdout
    if not out.strip():
        return []
    return [d["back-file"] for d in json.loads(out)["loopdevices"]]


def mounts_under(*prefixes: Path) -> list[str]:
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    return [m for m in points if any(m.startswith(str(p)) for p in prefixes)]


def qsd_processes(*markers: Path) -> list[int]:
    """Live qemu-storage-daemon processes whose command line names one of ``markers``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if b"qemu-storage-daemon" in cmd and state not in ("Z", "X") and any(
                str(m).encode() in cmd for m in markers):
            pids.append(int(pid))
    return pids


def files_under(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if not p.is_dir())


def assert_no_leaks(root: Path, run_dir: Path) -> None:
    assert loops_under(root, run_dir) == []
    assert [f for f in losetup_files() if f.startswith((str(root), str(run_dir)))] == []
    assert mounts_under(root, run_dir) == []
    assert qsd_processes(root, run_dir) == []
    assert files_under(root) == []
    assert not run_dir.exists()
