"""Writeback pacing (kata_ipu.rootfs.writeback) against the kernel: what is written into a
building image reaches the image file while the build goes on, not only at its final sync."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kata_ipu.osutil.mountinfo import mounts_under
from kata_ipu.rootfs import writeback
from kata_ipu.rootfs.writers import LoopExt4Writer, SizePolicy
from kata_ipu.testing.daemon import loops_under


def _in_image(image: Path, pattern: bytes) -> bool:
    """Does the image file hold ``pattern`` (read through its page cache, as the pool has
    it), without syncing anything?"""
    with open(image, "rb") as f:
        while chunk := f.read(8 << 20):
            if pattern in chunk:
                return True
    return False


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "unpaced"])
def test_applied_data_reaches_the_image_file_during_the_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, paced: bool) -> None:
    if not paced:  # the oracle's control: without pacing the data stays in ext4's cache
        monkeypatch.setattr(writeback.Pacer, "start", lambda self: None)
    image = tmp_path / "image.partial"
    writer = LoopExt4Writer(image, SizePolicy(min_size=64 << 20, max_size=256 << 20), "seed",
                            initial_size=64 << 20)
    root = Path(writer.open())
    try:
        pattern = os.urandom(32)
        (root / "payload").write_bytes(pattern * 4096)
        deadline = time.monotonic() + 2  # 40 pacing intervals; the kernel's own flusher
        arrived = False                  # waits 30 s before it writes dirty data back
        while not arrived and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = _in_image(image, pattern)
        assert arrived is paced
        info = writer.finish()
    except BaseException:
        writer.abort()
        raise
    assert info.fsck and _in_image(image, pattern)
    assert not mounts_under(tmp_path) and not loops_under(tmp_path)
