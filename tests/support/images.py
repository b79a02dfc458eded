"""The rootfs test image zoo, plus a cached Debian minbase tree.

Each ``*_layers`` function returns a list of uncompressed layer tars (bytes) that
``ocibuild.OciLayout.add_image`` turns into an image. ``debian_minbase_tree`` runs
``debootstrap --variant=minbase`` once and keeps the result OUTSIDE the repository (default
``/var/cache/kata-ipu-tests``, override with ``KATA_IPU_TEST_CACHE``), so later runs reuse it.

Nothing here runs at import time.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from kata_ipu.testing.ocibuild import (
    MT_CONFIG,
    MT_MANIFEST,
    Compression,
    LayerBuilder,
    OciLayout,
    busybox_tree,
)
from kata_ipu.testing.registry import RegistryServer, push
from tests.support.cache import cache_dir, locked

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"

# A file capability blob: VFS_CAP_REVISION_2, cap_net_bind_service permitted+effective.
CAP_NET_BIND_SERVICE = (
    b"\x01\x00\x00\x02" + b"\x00\x04\x00\x00" + b"\x00\x00\x00\x00" + b"\x00" * 8
)


def debian_minbase_tree(timeout: float = 900.0) -> Path:
    """A ``debootstrap --variant=minbase`` tree, built on first use and cached (needs root)."""
    base = cache_dir()
    final = base / f"debian-{DEBIAN_SUITE}-minbase"
    stamp = final / ".kata-ipu-complete"
    if stamp.exists():
        return final / "rootfs"
    with locked(base / f".debian-{DEBIAN_SUITE}-minbase.lock"):
        if stamp.exists():
            return final / "rootfs"
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=".debootstrap-", dir=base))
        try:
            done = subprocess.run(
                ["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(tmp / "rootfs"),
                 DEBIAN_MIRROR],
                check=False, capture_output=True, timeout=timeout,
            )
            if done.returncode != 0:
                tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(
                    f"debootstrap --variant=minbase {DEBIAN_SUITE} from {DEBIAN_MIRROR} failed "
                    f"(exit {done.returncode}; needs network access to the mirror): "
                    + " | ".join(tail))
            # Package caches and logs differ between runs and carry nothing the tests need.
            for sub in ("var/cache/apt/archives", "var/log", "var/lib/apt/lists"):
                victim = tmp / "rootfs" / sub
                if victim.is_dir():
                    for child in victim.iterdir():
                        if child.is_file() or child.is_symlink():
                            child.unlink()
            (tmp / ".kata-ipu-complete").write_text("ok\n")
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final / "rootfs"


def busybox_layers(workdir: Path) -> list[bytes]:
    """One layer: a real busybox rootfs."""
    tree = busybox_tree(workdir / "busybox-tree")
    return [LayerBuilder().tree(tree).build()]


def zoo_layers() -> list[bytes]:
    """Three layers exercising every OCI layer feature umoci also implements.

    Whiteouts and opaque dirs, hardlinks across layers, devices, FIFOs, setuid/setgid/sticky,
    xattrs (``user.*`` and ``security.capability``), symlink chains, dir<->file replacement.
    """
    l1 = (
        LayerBuilder()
        .dir("etc").file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42)
        .dir("bin").file("bin/tool", b"#!/bin/sh\necho tool\n" * 50, mode=0o4755)
        .file("bin/sgid", b"sgid", mode=0o2711, uid=0, gid=5)
        .file("bin/cap", b"\x7fELF-ish", mode=0o755, xattrs={
            "security.capability": CAP_NET_BIND_SERVICE})
        .dir("tmp", mode=0o1777)
        .dir("dev").device("dev/null", "char", 1, 3, mode=0o666)
        .device("dev/loop9", "block", 7, 9, mode=0o660).fifo("dev/initctl", mode=0o600)
        .dir("data", uid=1000, gid=1000, xattrs={"user.tag": b"base"})
        .file("data/a", b"A" * 5000, uid=1000, gid=1000, xattrs={"user.k": b"v1"})
        .file("data/b", b"B" * 10, uid=1001, gid=1002)
        .dir("data/sub").file("data/sub/deep", b"deep")
        .dir("opq").file("opq/old1", b"1").dir("opq/olddir").file("opq/olddir/x", b"x")
        .dir("gone").file("gone/f", b"f")
        .file("becomes_dir", b"i was a file")
        .dir("becomes_file").file("becomes_file/child", b"c")
        .file("lower_target", b"hardlinked from above", mode=0o600, uid=7, gid=8)
        .symlink("link1", "link2").symlink("link2", "link3").symlink("link3", "data/a")
        .symlink("abs_link", "/etc/passwd")
        .symlink("dangling", "/nonexistent/path")
        .build()
    )
    l2 = (
        LayerBuilder()
        .whiteout("gone")
        .whiteout("data/b")
        .opaque("opq")
        .file("opq/new", b"new")
        .dir("becomes_dir", mode=0o750).file("becomes_dir/inside", b"in")
        .file("becomes_file", b"now a file", mode=0o600)
        .hardlink("hl_lower", "lower_target")
        .file("data/c", b"C" * 70000, mode=0o640)
        .hardlink("data/c_link", "data/c")
        .file("data/a", b"A2" * 10, uid=1000, gid=1000, xattrs={"user.k": b"v2"})
        .dir("data", mode=0o770, uid=1000, gid=1000)
        .symlink("bin/sh", "tool")
        .build()
    )
    l3 = (
        LayerBuilder()
        .whiteout("data/sub")
        .whiteout("hl_lower")  # the other name of the inode must survive
        .file("etc/motd", b"hello\n")
        .whiteout("link3")  # breaks the chain; link1 -> link2 -> (dangling)
        .dir("gone", mode=0o700).file("gone/again", b"back")
        .build()
    )
    return [l1, l2, l3]


def big_file_layers(total_mib: int, files: int = 64, seed: int = 1) -> list[bytes]:
    """One layer of compressible pseudo-random text files, about ``total_mib`` MiB in all."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(4096)]
    per_file = total_mib * 1024 * 1024 // files
    lb = LayerBuilder().dir("blob")
    for i in range(files):
        chunk = b" ".join(rng.choice(words) for _ in range(20000))
        data = (chunk * (per_file // len(chunk) + 1))[:per_file]
        lb.file(f"blob/f{i:04d}", data)
    return [lb.build()]


def debian_minbase_layout(compression: Compression = "gzip") -> tuple[Path, str]:
    """An OCI layout holding the cached minbase tree as a one-layer image, tagged
    ``minbase``; built once next to the tree. Returns (layout path, manifest digest)."""
    tree = debian_minbase_tree()
    base = cache_dir()
    final = base / f"oci-debian-{DEBIAN_SUITE}-minbase-{compression}"
    stamp = final / ".kata-ipu-complete"
    if not stamp.exists():
        with locked(base / f".oci-debian-minbase-{compression}.lock"):
            if not stamp.exists():
                if final.exists():
                    shutil.rmtree(final)
                tmp = Path(tempfile.mkdtemp(prefix=".oci-", dir=base))
                try:
                    layout = OciLayout(tmp)
                    img = layout.add_image([LayerBuilder().tree(tree).build()], ref="minbase",
                                           compression=compression)
                    (tmp / ".kata-ipu-complete").write_text(img.manifest.digest + "\n")
                    tmp.rename(final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return final, stamp.read_text().strip()


def add_raw_image(layout: OciLayout, blobs: list[tuple[bytes, str]], diff_ids: list[str],
                  ref: str) -> str:
    """An image from already-encoded layer blobs ((bytes, media type)) and explicit diff_ids,
    for hostile cases (truncated streams, wrong diff_ids). Returns the manifest digest."""
    descs = [layout.add_blob(data, mt) for data, mt in blobs]
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg = layout.add_blob(json.dumps(config).encode(), MT_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cfg.to_json(),
                "layers": [d.to_json() for d in descs]}
    mdesc = layout.add_blob(json.dumps(manifest).encode(), MT_MANIFEST)
    return mdesc.digest


def gzip_bomb(file_bytes: int) -> tuple[bytes, str]:
    """A gzip layer holding one all-zero file of ``file_bytes``: (blob, diff_id). The blob is
    about 1/1000 of the uncompressed size."""
    info = tarfile.TarInfo("bomb")
    info.size = file_bytes
    head = info.tobuf(format=tarfile.PAX_FORMAT)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    h = hashlib.sha256(head)
    out = [comp.compress(head)]
    zeros = bytes(1 << 20)
    left = file_bytes
    while left > 0:
        chunk = zeros[:min(left, len(zeros))]
        h.update(chunk)
        out.append(comp.compress(chunk))
        left -= len(chunk)
    tail = bytes(-file_bytes % 512) + bytes(1024)
    h.update(tail)
    out.append(comp.compress(tail))
    out.append(comp.flush())
    return b"".join(out), "sha256:" + h.hexdigest()


@contextmanager
def busybox_registry(work: Path, repo: str, tags: Mapping[str, Sequence[bytes]], *,
                     compression: Compression = "gzip") -> Iterator[RegistryServer]:
    """A private ``docker-registry`` serving ``<repo>:<tag>`` = a busybox layer plus the tag's
    own layers (uncompressed tars, e.g. from :class:`LayerBuilder`), pushed with skopeo."""
    with RegistryServer(work) as reg:
        layout = OciLayout(work / "oci")
        base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
        for tag, layers in tags.items():
            layout.add_image([base, *layers], ref=tag, compression=compression)
            push(work / "oci", tag, f"{reg.address}/{repo}:{tag}")
        yield reg
