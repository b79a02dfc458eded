"""Cancellation in the middle of a build leaves no mount, loop device, staging tree or partial
image behind: via a ``threading.Event`` and via asyncio task cancellation."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from kata_ipu.rootfs.builder import BuildConfig, RootfsBuilder
from kata_ipu.rootfs.errors import BuildCancelled
from kata_ipu.rootfs.oci import ImageConfig, Manifest, OciLayoutSource
from kata_ipu.testing.hostcheck import leftovers
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout
from kata_ipu.testing.prereq import require_programs, require_root


class GatedSource:
    """An OCI layout that pauses when the builder opens the second layer's blob."""

    def __init__(self, path: Path) -> None:
        self.inner = OciLayoutSource(path)
        self.opened = 0
        self.reached = threading.Event()
        self.proceed = threading.Event()

    def manifest(self, digest: str) -> Manifest:
        return self.inner.manifest(digest)

    def config(self, manifest: Manifest) -> ImageConfig:
        return self.inner.config(manifest)

    def open_blob(self, digest: str) -> BinaryIO:
        self.opened += 1
        if self.opened == 2:
            self.reached.set()
            assert self.proceed.wait(30)
        return self.inner.open_blob(digest)


def _image(tmp: Path) -> tuple[Path, str]:
    layers = [LayerBuilder().file(f"l{i}/f", b"x" * 1000).build() for i in range(3)]
    built = OciLayout(tmp / "oci").add_image(layers, ref=None, tag_in_index=False)
    return tmp / "oci", built.manifest.digest


@pytest.fixture(autouse=True)
def _prereq() -> None:
    require_root()
    require_programs("mkfs.ext4", "e2fsck", "resize2fs", "losetup", "mount", "umount")


@pytest.mark.parametrize("strategy", ["stage", "loop"])
def test_cancel_event_mid_build(tmp_path: Path, strategy: str) -> None:
    layout, digest = _image(tmp_path)
    source = GatedSource(layout)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cancel = threading.Event()
    builder = RootfsBuilder(source, BuildConfig(ext4_strategy=strategy))  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            builder.build(digest, out_dir / "img.ext4", cancel=cancel)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert source.reached.wait(30)
    if strategy == "loop":
        assert leftovers(tmp_path) != []  # really mid-build: the image is mounted now
    cancel.set()
    source.proceed.set()
    t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], BuildCancelled)
    assert os.listdir(out_dir) == []
    assert leftovers(tmp_path) == []


async def test_asyncio_task_cancel_cleans_up(tmp_path: Path) -> None:
    layout, digest = _image(tmp_path)
    source = GatedSource(layout)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    builder = RootfsBuilder(source, BuildConfig(ext4_strategy="loop"))
    task = asyncio.create_task(builder.abuild(digest, out_dir / "img.ext4"))
    assert await asyncio.to_thread(source.reached.wait, 30)
    task.cancel()
    await asyncio.sleep(0)
    source.proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # abuild returns only after the worker thread finished its cleanup.
    assert os.listdir(out_dir) == []
    assert leftovers(tmp_path) == []
