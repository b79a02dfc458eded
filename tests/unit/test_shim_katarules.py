"""The proxy's rules for the Kata delegate (shim_hooks/katarules.py): what it refuses, and
when the spec must carry root.readonly because Kata's Go runtime drops the mount's ``ro``."""

from __future__ import annotations

import pytest

from kata_ipu.errors import FailedPrecondition
from shim_hooks import katarules
from shim_hooks.taskapi import Mount

OVERLAY = Mount("overlay", "overlay", options=("lowerdir=/a:/b", "upperdir=/u", "workdir=/w"))


def test_erofs_refused_for_kata_only() -> None:
    with pytest.raises(FailedPrecondition, match=r"EROFS rootfs cannot go to Kata.*ext4 or xfs"):
        katarules.check_export("kata", "erofs", "default/c1")
    katarules.check_export("runc", "erofs", "default/c1")  # runc mounts it as asked
    katarules.check_export("kata", "ext4", "default/c1")


@pytest.mark.parametrize(("delegate", "options", "spec", "needed"), [
    ("kata", ("ro",), {"root": {"path": "rootfs"}}, True),
    ("kata", ("ro",), {"root": {"path": "rootfs", "readonly": True}}, False),
    ("kata", (), {"root": {"path": "rootfs"}}, False),
    ("runc", ("ro",), {"root": {"path": "rootfs"}}, False),  # runc keeps the mount's ro
    ("kata", ("ro",), {}, True),
])
def test_readonly_root_only_where_kata_would_lose_it(
        delegate: str, options: tuple[str, ...], spec: dict[str, object], needed: bool) -> None:
    assert katarules.needs_readonly_root(delegate, options, spec) is needed


def test_passthrough_with_kata_only_for_overlayfs() -> None:
    katarules.check_passthrough("kata", (OVERLAY,), "c1", "IPU unreachable")
    katarules.check_passthrough("runc", (Mount("ext4", "/dev/sda1"),), "c1", "x")
    with pytest.raises(FailedPrecondition, match=r"ext4 /dev/sda1, not overlayfs.*"
                                                 r"runtime#2734.*because: IPU unreachable"):
        katarules.check_passthrough("kata", (Mount("ext4", "/dev/sda1"),), "c1",
                                    "IPU unreachable")
    with pytest.raises(FailedPrecondition, match="bind /srv/root"):
        katarules.check_passthrough("kata", (OVERLAY, Mount("bind", "/srv/root")), "c1", "x")
    with pytest.raises(FailedPrecondition, match="no rootfs mounts"):
        katarules.check_passthrough("kata", (), "c1", "x")
