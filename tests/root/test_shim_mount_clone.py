"""``hostmount.mount_clone`` against the kernel: an ext4 clone is mounted without loading its
journal, unless the journal needs recovery (then with it, which recovers it)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu.osutil.mountinfo import mounts_under
from shim_hooks import hostmount


@pytest.fixture
def ext4_loop(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    image = tmp_path / "clone.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image), "64M"], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        yield dev, target
    finally:
        hostmount.umount(target)
        subprocess.run(["losetup", "-d", dev], check=False)
    assert not mounts_under(tmp_path)


def _options(target: Path) -> list[str]:
    """The mount's options as the kernel reports them in /proc/mounts."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(target):
            return fields[3].split(",")
    raise AssertionError(f"{target} is not mounted")


def test_a_clean_ext4_clone_is_mounted_read_write_without_its_journal(
        ext4_loop: tuple[str, Path]) -> None:
    dev, target = ext4_loop
    hostmount.mount_clone(dev, target, "ext4")
    opts = _options(target)
    assert "rw" in opts and "norecovery" in opts, opts
    (target / "written").write_text("ok")  # writable without a journal
    assert hostmount.umount(target)


def test_a_clone_whose_journal_needs_recovery_is_mounted_with_it(
        ext4_loop: tuple[str, Path]) -> None:
    dev, target = ext4_loop
    # what a clone in use when the host crashed looks like: ext4 refuses noload for it
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", dev], check=True,
                   capture_output=True)
    hostmount.mount_clone(dev, target, "ext4")
    assert "norecovery" not in _options(target)
    assert hostmount.umount(target)
    features = subprocess.run(["dumpe2fs", "-h", dev], check=True, capture_output=True,
                              text=True).stdout
    assert "needs_recovery" not in features  # the kernel replayed the journal


def test_other_filesystems_are_mounted_as_asked(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    hostmount.mount_clone("tmpfs", target, "tmpfs", ("size=1m",))
    try:
        assert "norecovery" not in _options(target)
    finally:
        hostmount.umount(target)
