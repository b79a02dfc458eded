"""Hostile layers through the whole builder, with both ext4 strategies.

For each case: the error (or, for symlink tricks, the confinement) is checked; a canary file
outside the image root is untouched; no mount, loop device, staging dir or partial image is
left. The "loop" strategy has the image loop-mounted while the hostile layer is applied, so it
also proves the teardown of a failed build.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kata_ipu.errors import KataIpuError
from kata_ipu.rootfs.builder import BuildConfig, RootfsBuilder
from kata_ipu.rootfs.errors import (
    BadLayer,
    BlobDigestMismatch,
    CorruptLayer,
    DiffIdMismatch,
    ImageTooLarge,
    LayerTooLarge,
    PathEscape,
)
from kata_ipu.rootfs.mount import mounted
from kata_ipu.rootfs.oci import OciLayoutSource
from kata_ipu.rootfs.writers import SizePolicy
from kata_ipu.testing.hostcheck import leftovers
from kata_ipu.testing.ocibuild import MT_LAYER, LayerBuilder, OciLayout
from kata_ipu.testing.prereq import require_programs, require_root
from tests.support.images import add_raw_image, gzip_bomb

MiB = 1 << 20
GZ = MT_LAYER["gzip"]


@dataclass
class Env:
    tmp: Path
    layout: OciLayout
    out_dir: Path
    canary: Path
    strategy: str

    def build(self, digest: str, **cfg: int) -> Path:
        config = BuildConfig(
            fs_type="ext4", ext4_strategy=self.strategy,  # type: ignore[arg-type]
            size=SizePolicy(headroom_bytes=8 * MiB, min_size=32 * MiB, max_size=256 * MiB),
            max_layer_bytes=cfg.get("max_layer_bytes", 64 * MiB))
        out = self.out_dir / "image.ext4"
        RootfsBuilder(OciLayoutSource(self.layout.path), config).build(digest, out)
        return out

    def image(self, layers: list[bytes]) -> str:
        return self.layout.add_image(layers, ref=None, tag_in_index=False).manifest.digest


def _canary_state(p: Path) -> tuple[bytes, int, int, int]:
    st = os.lstat(p)
    return p.read_bytes(), st.st_ino, st.st_nlink, st.st_mtime_ns


@pytest.fixture(params=["stage", "loop"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    require_root()
    require_programs("mkfs.ext4", "e2fsck", "resize2fs", "losetup", "mount", "umount")
    canary = tmp_path / "host" / "canary"
    canary.parent.mkdir()
    canary.write_bytes(b"do not touch\n")
    shadow_before = os.lstat("/etc/shadow")
    before = _canary_state(canary)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    e = Env(tmp_path, OciLayout(tmp_path / "oci"), out_dir, canary, request.param)
    yield e
    assert _canary_state(canary) == before
    assert sorted(os.listdir(canary.parent)) == ["canary"]
    st = os.lstat("/etc/shadow")
    assert (st.st_ino, st.st_nlink, st.st_mtime_ns) == (
        shadow_before.st_ino, shadow_before.st_nlink, shadow_before.st_mtime_ns)
    assert leftovers(tmp_path) == []


def _expect_clean_failure(env: Env, exc_type: type[KataIpuError], digest: str,
                          **cfg: int) -> KataIpuError:
    with pytest.raises(exc_type) as ei:
        env.build(digest, **cfg)
    # Nothing at all is left where the image would have gone: no partial image, no staging
    # tree, no mount point.
    assert os.listdir(env.out_dir) == []
    assert str(ei.value)
    return ei.value


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../../escape"])
def test_dotdot_escape(env: Env, name: str) -> None:
    digest = env.image([LayerBuilder().file(name, b"pwned").build()])
    err = _expect_clean_failure(env, PathEscape, digest)
    assert "'..'" in str(err)


def test_absolute_symlink_then_file_through_it(env: Env) -> None:
    # The symlink's target is the canary's absolute *host* directory. Resolution happens in
    # the image root, so the file lands inside the image, at that path.
    digest = env.image([LayerBuilder().symlink("evil", str(env.canary.parent))
                        .file("evil/canary", b"pwned").build()])
    image = env.build(digest)
    mnt = env.tmp / "mnt"
    mnt.mkdir()
    with mounted(image, mnt, fstype="ext4"):
        inside = mnt / str(env.canary).lstrip("/")
        assert inside.read_bytes() == b"pwned"
        assert os.readlink(mnt / "evil") == str(env.canary.parent)


def test_symlinked_parent_dir_with_dotdot_escape(env: Env) -> None:
    up = "../" * 20 + str(env.canary.parent).lstrip("/")
    digest = env.image([LayerBuilder().symlink("up", up).file("up/canary", b"pwned")
                        .file("up/new", b"pwned").build()])
    image = env.build(digest)
    mnt = env.tmp / "mnt"
    mnt.mkdir()
    with mounted(image, mnt, fstype="ext4"):
        assert (mnt / str(env.canary).lstrip("/")).read_bytes() == b"pwned"


@pytest.mark.parametrize("via_symlink", [False, True])
def test_hardlink_to_etc_shadow(env: Env, via_symlink: bool) -> None:
    lb = LayerBuilder()
    if via_symlink:
        lb.symlink("hostetc", "/etc").hardlink("stolen", "hostetc/shadow")
    else:
        lb.hardlink("stolen", "/etc/shadow")
    err = _expect_clean_failure(env, BadLayer, env.image([lb.build()]))
    assert "does not exist" in str(err)


@pytest.mark.parametrize("name", ["sub/.wh..", ".wh..", "sub/.wh.."])
def test_whiteout_of_dotdot(env: Env, name: str) -> None:
    digest = env.image([LayerBuilder().dir("sub").file(name).build()])
    _expect_clean_failure(env, PathEscape, digest)


def _sparse_claim_layer(real_size: int) -> bytes:
    payload = b"1\n0\n1\n".ljust(512, b"\0") + b"x"
    info = tarfile.TarInfo("GNUSparseFile.0/huge")
    info.size = len(payload)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": "huge", "GNU.sparse.realsize": str(real_size)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _size_claim_layer(size: int) -> bytes:
    info = tarfile.TarInfo("huge")
    info.size = size
    return info.tobuf(format=tarfile.PAX_FORMAT) + b"y" * 1024


@pytest.mark.parametrize("kind", ["pax-sparse", "header-size"])
def test_ten_gib_claim_in_tiny_layer(env: Env, kind: str) -> None:
    raw = _sparse_claim_layer(10 << 30) if kind == "pax-sparse" else _size_claim_layer(10 << 30)
    assert len(gzip.compress(raw)) < 2048
    digest = add_raw_image(env.layout, [(gzip.compress(raw), GZ)],
                           ["sha256:" + hashlib.sha256(raw).hexdigest()], "claim")
    err = _expect_clean_failure(env, ImageTooLarge, digest)
    assert isinstance(err, ImageTooLarge) and err.needed >= 10 << 30


@functools.cache
def _bomb() -> tuple[bytes, str]:
    return gzip_bomb(100 * MiB)  # under the 256 MiB image maximum: only the layer limit stops it


def test_decompression_bomb(env: Env) -> None:
    blob, diff_id = _bomb()
    assert len(blob) < 200 * 1024
    digest = add_raw_image(env.layout, [(blob, GZ)], [diff_id], "bomb")
    err = _expect_clean_failure(env, LayerTooLarge, digest, max_layer_bytes=32 * MiB)
    assert "limit" in str(err)


def test_truncated_gzip(env: Env) -> None:
    raw = LayerBuilder().file("a", os.urandom(200_000)).build()
    blob = gzip.compress(raw)[: 100_000]  # the descriptor matches the truncated blob
    digest = add_raw_image(env.layout, [(blob, GZ)],
                           ["sha256:" + hashlib.sha256(raw).hexdigest()], "trunc")
    err = _expect_clean_failure(env, CorruptLayer, digest)
    assert "truncated gzip" in str(err)


def test_diff_id_mismatch(env: Env) -> None:
    good = LayerBuilder().file("a", b"a").build()
    evil = LayerBuilder().file("a", b"b").build()
    digest = add_raw_image(env.layout, [(gzip.compress(good), GZ), (gzip.compress(evil), GZ)],
                           ["sha256:" + hashlib.sha256(good).hexdigest(),
                            "sha256:" + hashlib.sha256(good).hexdigest()], "mismatch")
    err = _expect_clean_failure(env, DiffIdMismatch, digest)
    assert isinstance(err, DiffIdMismatch)
    assert err.layer == 1 and err.actual == "sha256:" + hashlib.sha256(evil).hexdigest()


def test_tampered_blob(env: Env) -> None:
    digest = env.image([LayerBuilder().file("a", b"a" * 1000).build()])
    manifest = OciLayoutSource(env.layout.path).manifest(digest)
    blob = env.layout.blob_path(manifest.layers[0].digest)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF  # gzip trailer (CRC/size) byte: still inflates, digest differs
    blob.write_bytes(bytes(data))
    _expect_clean_failure(env, (BlobDigestMismatch, CorruptLayer), digest)  # type: ignore[arg-type]


def test_name_longer_than_path_max(env: Env) -> None:
    name = "/".join(["d" * 200] * 25)
    digest = env.image([LayerBuilder().file(name, b"x").build()])
    err = _expect_clean_failure(env, PathEscape, digest)
    assert "PATH_MAX" in str(err)
