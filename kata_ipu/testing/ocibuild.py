"""Build OCI image layouts for tests, without a registry and without Docker Hub.

``LayerBuilder`` produces one tar layer from explicit entries (files, dirs, links, devices,
whiteouts, xattrs); ``busybox_tree`` makes a tiny real rootfs from Debian's busybox-static;
``OciLayout`` writes blobs, configs, manifests and ``index.json`` in OCI image-layout form so
that skopeo, umoci and kata-ipu's own store can read the result.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zstandard

Compression = Literal["gzip", "zstd", "none"]

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}

FIXED_MTIME = 1_700_000_000


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "mediaType": self.media_type, "digest": self.digest, "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


class LayerBuilder:
    """Accumulates tar entries for one layer, in order, and renders an uncompressed tar."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(  # noqa: SIM115 - closed by build()
            fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT
        )

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None,
             xattrs: dict[str, bytes] | None = None) -> LayerBuilder:
        if not info.mtime:
            info.mtime = FIXED_MTIME
        if xattrs:
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                for k, v in xattrs.items()
            }
        self._tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return self

    @staticmethod
    def _info(path: str, kind: bytes, mode: int, uid: int, gid: int,
              mtime: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = mtime
        return info

    def file(self, path: str, data: bytes = b"", *, mode: int = 0o644, uid: int = 0,
             gid: int = 0, mtime: int = FIXED_MTIME,
             xattrs: dict[str, bytes] | None = None) -> LayerBuilder:
        info = self._info(path, tarfile.REGTYPE, mode, uid, gid, mtime)
        info.size = len(data)
        return self._add(info, data, xattrs)

    def dir(self, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0,
            mtime: int = FIXED_MTIME, xattrs: dict[str, bytes] | None = None) -> LayerBuilder:
        return self._add(self._info(path, tarfile.DIRTYPE, mode, uid, gid, mtime), None, xattrs)

    def symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0) -> LayerBuilder:
        info = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid, FIXED_MTIME)
        info.linkname = target
        return self._add(info)

    def hardlink(self, path: str, target: str) -> LayerBuilder:
        info = self._info(path, tarfile.LNKTYPE, 0o644, 0, 0, FIXED_MTIME)
        info.linkname = target
        return self._add(info)

    def device(self, path: str, kind: Literal["char", "block"], major: int, minor: int, *,
               mode: int = 0o600) -> LayerBuilder:
        info = self._info(path, tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE,
                          mode, 0, 0, FIXED_MTIME)
        info.devmajor, info.devminor = major, minor
        return self._add(info)

    def fifo(self, path: str, *, mode: int = 0o644) -> LayerBuilder:
        return self._add(self._info(path, tarfile.FIFOTYPE, mode, 0, 0, FIXED_MTIME))

    def whiteout(self, path: str) -> LayerBuilder:
        """Delete ``path`` from lower layers (``dir/.wh.name``)."""
        head, _, name = path.rstrip("/").rpartition("/")
        return self.file(f"{head}/.wh.{name}" if head else f".wh.{name}")

    def opaque(self, directory: str) -> LayerBuilder:
        """Hide everything lower layers put in ``directory`` (``dir/.wh..wh..opq``)."""
        return self.file(f"{directory.rstrip('/')}/.wh..wh..opq")

    def tree(self, root: str | os.PathLike[str], arcroot: str = "") -> LayerBuilder:
        """Add a real directory tree (sorted, owners and modes kept, mtimes fixed)."""
        root = Path(root)
        paths = sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix())
        for p in paths:
            arc = (Path(arcroot) / p.relative_to(root)).as_posix() if arcroot else \
                p.relative_to(root).as_posix()
            info = self._tar.gettarinfo(str(p), arcname=arc)
            info.mtime = FIXED_MTIME
            info.uname = info.gname = ""
            if info.isreg():
                with open(p, "rb") as f:
                    self._tar.addfile(info, f)
            else:
                self._tar.addfile(info)
        return self

    def build(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def busybox_tree(dest: str | os.PathLike[str],
                 applets: Iterable[str] = ("sh", "ls", "cat", "echo", "true", "mount",
                                           "sync", "sleep", "id", "stat", "sha256sum",
                                           "dd", "wc", "touch", "rm", "mkdir")) -> Path:
    """A minimal real rootfs: Debian's static busybox plus applet symlinks and /etc files."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise FileNotFoundError("busybox not found (install Debian's busybox-static)")
    dest = Path(dest)
    for d in ("bin", "etc", "dev", "proc", "sys", "tmp", "root", "var/tmp"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copy2(busybox, dest / "bin/busybox")
    (dest / "bin/busybox").chmod(0o755)
    for applet in applets:
        link = dest / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    return dest


@dataclass(frozen=True)
class BuiltImage:
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]


def _ref_name(entry: dict[str, object]) -> str | None:
    annotations = entry.get("annotations")
    if isinstance(annotations, dict):
        ref = annotations.get("org.opencontainers.image.ref.name")
        return ref if isinstance(ref, str) else None
    return None


class OciLayout:
    """Writes an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        (self.path / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        index = self.path / "index.json"
        self._manifests: list[dict[str, object]] = (
            json.loads(index.read_text())["manifests"] if index.exists() else []
        )
        self._write_index()

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return self.path / "blobs" / algo / hexd

    def add_blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            path.write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def add_image(
        self,
        layers: Sequence[bytes],
        *,
        ref: str | None = "latest",
        compression: Compression = "gzip",
        architecture: str = "amd64",
        os_name: str = "linux",
        variant: str | None = None,
        config_extra: dict[str, object] | None = None,
        tag_in_index: bool = True,
    ) -> BuiltImage:
        """Add an image from uncompressed layer tars; returns its descriptors."""
        layer_descs = []
        diff_ids = []
        for raw in layers:
            diff_ids.append(sha256_digest(raw))
            layer_descs.append(self.add_blob(compress(raw, compression), MT_LAYER[compression]))
        config: dict[str, object] = {
            "architecture": architecture,
            "os": os_name,
            "created": "2023-11-14T22:13:20Z",
            "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "kata-ipu test builder"} for _ in layers],
        }
        if variant:
            config["variant"] = variant
        if config_extra:
            config.update(config_extra)
        cfg = self.add_blob(json.dumps(config, sort_keys=True).encode(), MT_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": cfg.to_json(),
            "layers": [d.to_json() for d in layer_descs],
        }
        mdesc = self.add_blob(json.dumps(manifest, sort_keys=True).encode(), MT_MANIFEST)
        platform = {"architecture": architecture, "os": os_name}
        if variant:
            platform["variant"] = variant
        if tag_in_index:
            annotations = {"org.opencontainers.image.ref.name": ref} if ref else {}
            self._manifests = [
                m for m in self._manifests if not ref or _ref_name(m) != ref
            ]
            self._manifests.append(
                Descriptor(MT_MANIFEST, mdesc.digest, mdesc.size, annotations,
                           platform).to_json()
            )
            self._write_index()
        return BuiltImage(Descriptor(MT_MANIFEST, mdesc.digest, mdesc.size, {}, platform),
                          cfg, tuple(layer_descs), tuple(diff_ids))

    def add_index(self, images: Sequence[BuiltImage], *, ref: str = "latest") -> Descriptor:
        """A multi-platform image index over already-added images, tagged ``ref``."""
        index = {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [img.manifest.to_json() for img in images],
        }
        desc = self.add_blob(json.dumps(index, sort_keys=True).encode(), MT_INDEX)
        self._manifests = [m for m in self._manifests if _ref_name(m) != ref]
        self._manifests.append(Descriptor(
            MT_INDEX, desc.digest, desc.size, {"org.opencontainers.image.ref.name": ref}
        ).to_json())
        self._write_index()
        return desc

    def _write_index(self) -> None:
        data = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self._manifests}
        tmp = self.path / "index.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(self.path / "index.json")
