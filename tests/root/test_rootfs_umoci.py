"""umoci as the reference unpacker: build images, unpack them with ``umoci unpack`` and with
kata-ipu's builder, mount our image read-only and compare the trees entry by entry (type, mode,
uid, gid, size, content hash, link target, rdev, xattrs, hardlink count).

Images: busybox; the "zoo" (three layers: whiteouts, opaque dirs, hardlinks across layers,
devices, FIFOs, setuid/setgid/sticky, xattrs incl. security.capability, symlink chains,
dir<->file replacement); a Debian bookworm minbase tree from debootstrap (cached in
/var/cache/kata-ipu-tests). umoci 0.4.7 cannot read zstd layers, so zstd images are compared
against umoci's unpack of the same tars gzip-compressed (same diff_ids).
"""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kata_ipu.errors import InvalidArgument
from kata_ipu.rootfs.builder import BuildConfig, RootfsBuilder
from kata_ipu.rootfs.mount import mounted
from kata_ipu.rootfs.oci import OciLayoutSource
from kata_ipu.rootfs.writers import SizePolicy
from kata_ipu.testing import treecmp
from kata_ipu.testing.hostcheck import leftovers
from kata_ipu.testing.ocibuild import MT_LAYER, OciLayout
from kata_ipu.testing.prereq import require_programs, require_root
from tests.support.images import (
    add_raw_image,
    busybox_layers,
    debian_minbase_layout,
    gzip_bomb,
    zoo_layers,
)

PROGRAMS = ("umoci", "mkfs.ext4", "e2fsck", "resize2fs", "mkfs.erofs", "losetup", "mount",
            "umount", "debootstrap")


@dataclass(frozen=True)
class Image:
    name: str
    layout: Path
    digest: str
    reference: dict[str, treecmp.Entry]  # umoci's unpack


def _umoci_tree(layout: Path, ref: str, work: Path) -> dict[str, treecmp.Entry]:
    bundle = work / f"bundle-{ref}"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{ref}", str(bundle)], check=True,
                   capture_output=True)
    return treecmp.snapshot(bundle / "rootfs")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Image]]:
    require_root()
    require_programs(*PROGRAMS)
    work = tmp_path_factory.mktemp("umoci-ref")
    layout = OciLayout(work / "oci")
    out: dict[str, Image] = {}
    zoo = zoo_layers()
    for name, layers, comp in (("busybox", busybox_layers(work), "gzip"),
                               ("zoo", zoo, "gzip"), ("zoo-none", zoo, "none")):
        built = layout.add_image(layers, ref=name, compression=comp)  # type: ignore[arg-type]
        out[name] = Image(name, layout.path, built.manifest.digest,
                          _umoci_tree(layout.path, name, work))
    built = layout.add_image(zoo, ref="zoo-zstd", compression="zstd")
    out["zoo-zstd"] = Image("zoo-zstd", layout.path, built.manifest.digest,
                            out["zoo"].reference)
    deb_layout, deb_digest = debian_minbase_layout()
    out["debian"] = Image("debian", deb_layout, deb_digest,
                          _umoci_tree(deb_layout, "minbase", work))
    yield out
    assert leftovers(work) == []


def _build_and_snapshot(image: Image, tmp: Path, config: BuildConfig,
                        out_name: str = "image") -> tuple[dict[str, treecmp.Entry], Path]:
    out = tmp / f"{out_name}.{config.fs_type}"
    RootfsBuilder(OciLayoutSource(image.layout), config).build(image.digest, out)
    mnt = tmp / f"mnt-{out_name}"
    mnt.mkdir()
    try:
        with mounted(out, mnt, fstype=config.fs_type):
            tree = treecmp.snapshot(mnt, ignore=("lost+found",))
    finally:
        mnt.rmdir()
    assert leftovers(tmp) == []
    return tree, out


CASES = [("busybox", "ext4", "stage"), ("busybox", "erofs", "stage"),
         ("zoo", "ext4", "stage"), ("zoo", "ext4", "loop"), ("zoo", "erofs", "stage"),
         ("zoo-none", "ext4", "stage"), ("zoo-zstd", "ext4", "stage"),
         ("debian", "ext4", "stage"), ("debian", "ext4", "loop"), ("debian", "erofs", "stage")]


@pytest.mark.parametrize(("name", "fs_type", "strategy"), CASES,
                         ids=["-".join(c) for c in CASES])
def test_matches_umoci(images: dict[str, Image], tmp_path: Path, name: str, fs_type: str,
                       strategy: str) -> None:
    image = images[name]
    config = BuildConfig(fs_type=fs_type, ext4_strategy=strategy)  # type: ignore[arg-type]
    tree, out = _build_and_snapshot(image, tmp_path, config)
    # umoci makes the bundle's rootfs dir itself (0755 root); its mode is not from the image.
    problems = treecmp.diff(image.reference, tree, skip_root_meta=True)
    assert problems == [], "\n".join(problems[:40])
    assert len(tree) > 10
    record = json.loads((out.parent / (out.name + ".build.json")).read_text())
    manifest = OciLayoutSource(image.layout).manifest(image.digest)
    config_diff_ids = OciLayoutSource(image.layout).config(manifest).diff_ids
    assert record["image_digest"] == image.digest
    assert [layer["diff_id"] for layer in record["layers"]] == list(config_diff_ids)
    assert record["fs_type"] == fs_type and record["size_bytes"] == out.stat().st_size
    if fs_type == "ext4":
        # The builder already ran it; check independently that the final image is clean.
        subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)


@pytest.mark.parametrize("fs_type", ["ext4", "erofs"])
def test_deterministic(images: dict[str, Image], tmp_path: Path, fs_type: str) -> None:
    """Two builds of the same image: same tree, types, owners, modes, xattrs, contents,
    link targets and device numbers (mtimes are not compared)."""
    config = BuildConfig(fs_type=fs_type)  # type: ignore[arg-type]
    image = images["zoo"]
    first, _ = _build_and_snapshot(image, tmp_path, config, "first")
    second, _ = _build_and_snapshot(image, tmp_path, config, "second")
    assert treecmp.diff(first, second) == []


def test_ext4_is_honestly_sized_and_container_gets_enospc(images: dict[str, Image],
                                                          tmp_path: Path) -> None:
    """Headroom is what the config says: filling the image ends in ENOSPC inside it after
    roughly the headroom, never more than the image size."""
    mib = 1 << 20
    config = BuildConfig(size=SizePolicy(headroom_ratio=0.0, headroom_bytes=32 * mib,
                                         min_size=8 * mib, max_size=1 << 30))
    image = images["busybox"]
    out = tmp_path / "img.ext4"
    RootfsBuilder(OciLayoutSource(image.layout), config).build(image.digest, out)
    size = out.stat().st_size
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    written = 0
    with mounted(out, mnt, fstype="ext4", read_only=False), open(mnt / "fill", "wb") as f:
        try:
            while True:
                f.write(b"\0" * mib)
                f.flush()
                written += mib
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC, inside the image
    assert 32 * mib <= written < size
    assert leftovers(tmp_path) == []


def test_loop_strategy_restarts_when_first_size_guess_is_too_small(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 300 MiB file of zeros is ~300 KiB of gzip. With a second, empty gzip member the
    trailer's size hint says 0 (unusable), so the first format (sized from compressed bytes)
    is far too small: the builder starts over at the maximum size, then still resizes the
    result to the honest size (content + headroom)."""
    require_root()
    require_programs(*PROGRAMS)
    layout = OciLayout(tmp_path / "oci")
    blob, diff_id = gzip_bomb(300 << 20)
    blob += gzip.compress(b"")  # multi-member: same tar, same diff_id
    digest = add_raw_image(layout, [(blob, MT_LAYER["gzip"])], [diff_id], "zeros")
    out = tmp_path / "img.ext4"
    with caplog.at_level(logging.INFO, logger="kata_ipu.rootfs"):
        result = RootfsBuilder(OciLayoutSource(layout.path), BuildConfig(ext4_strategy="loop")
                               ).build(digest, out)
    assert "image larger than guessed, rebuilding at the maximum size" in caplog.messages
    assert 300 << 20 < result.record["size_bytes"] < 500 << 20
    subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(out, mnt, fstype="ext4"):
        assert (mnt / "bomb").stat().st_size == 300 << 20
    assert leftovers(tmp_path) == []


def test_loop_strategy_sizes_its_first_format_from_the_gzip_size_hint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same 300 MiB of zeros in one gzip member: the trailer tells the tar size, so the
    first format is already close above the honest size and nothing restarts."""
    require_root()
    require_programs(*PROGRAMS)
    layout = OciLayout(tmp_path / "oci")
    blob, diff_id = gzip_bomb(300 << 20)
    digest = add_raw_image(layout, [(blob, MT_LAYER["gzip"])], [diff_id], "zeros")
    out = tmp_path / "img.ext4"
    with caplog.at_level(logging.INFO, logger="kata_ipu.rootfs"):
        result = RootfsBuilder(OciLayoutSource(layout.path), BuildConfig(ext4_strategy="loop")
                               ).build(digest, out)
    assert "image larger than guessed, rebuilding at the maximum size" not in caplog.messages
    final = result.record["size_bytes"]
    first = result.record["first_size_bytes"]
    assert final <= first < final * 1.25
    subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("layers", [1, 2])
def test_the_first_layers_of_an_image_match_umoci_on_an_image_of_just_those(
        images: dict[str, Image], tmp_path: Path, layers: int) -> None:
    """A base of an image's first N layers (what a lower snapshot of containerd's chain
    holds) is exactly what umoci unpacks from an image made of those N layers alone."""
    zoo = images["zoo"]
    layout = OciLayout(tmp_path / "oci")
    layout.add_image(zoo_layers()[:layers], ref="prefix")
    reference = _umoci_tree(layout.path, "prefix", tmp_path)
    out = tmp_path / "prefix.ext4"
    result = RootfsBuilder(OciLayoutSource(zoo.layout)).build(zoo.digest, out, layers=layers)
    assert len(result.record["layers"]) == layers
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(out, mnt, fstype="ext4"):
        tree = treecmp.snapshot(mnt, ignore=("lost+found",))
    problems = treecmp.diff(reference, tree, skip_root_meta=True)
    assert problems == [], "\n".join(problems[:40])
    assert treecmp.diff(zoo.reference, tree, skip_root_meta=True) != []  # not the whole zoo
    with pytest.raises(InvalidArgument, match="has 3 layers, not 4"):
        RootfsBuilder(OciLayoutSource(zoo.layout)).build(zoo.digest, tmp_path / "x", layers=4)
    assert leftovers(tmp_path) == []
