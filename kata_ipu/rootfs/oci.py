"""Typed view of what the builder reads from an image: manifest, config, layer blobs.

The builder takes an :class:`ImageSource` (a small protocol), so any content store works;
:class:`OciLayoutSource` reads an OCI image-layout directory (``index.json``,
``blobs/<algo>/<hex>``), which is also the on-disk shape of kata-ipu's content store.
Manifest and config JSON are parsed here into small frozen dataclasses; anything malformed is an
``InvalidArgument`` at this boundary, not a ``KeyError`` deep in the builder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from kata_ipu.errors import InvalidArgument
from kata_ipu.rootfs.errors import BlobDigestMismatch, BlobNotFound, UnsupportedMedia
from kata_ipu.rootfs.sizehint import uncompressed_hint

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# Layer media type -> compression.
LAYER_COMPRESSION: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """Only sha256 digests in canonical form (also keeps blob paths inside the layout)."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidArgument(f"invalid or unsupported digest {digest!r}")
    return digest


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def from_json(cls, raw: object, what: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{what}: descriptor is not an object")
        mt, dg, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
        if not isinstance(mt, str) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"{what}: descriptor lacks mediaType or size")
        return cls(mt, check_digest(str(dg)), size)


@dataclass(frozen=True, slots=True)
class Layer:
    descriptor: Descriptor
    compression: str

    @property
    def digest(self) -> str:
        return self.descriptor.digest


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    config: Descriptor
    layers: tuple[Layer, ...]

    @classmethod
    def parse(cls, digest: str, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"manifest {digest} is not JSON") from exc
        if not isinstance(raw, dict) or raw.get("schemaVersion") != 2:
            raise InvalidArgument(f"manifest {digest}: not a schemaVersion 2 image manifest")
        mt = raw.get("mediaType", MT_OCI_MANIFEST)
        if mt not in (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST):
            raise InvalidArgument(f"manifest {digest}: media type {mt!r} is not an image manifest")
        layers_raw = raw.get("layers")
        if not isinstance(layers_raw, list):
            raise InvalidArgument(f"manifest {digest}: no layers list")
        layers = []
        for i, lr in enumerate(layers_raw):
            desc = Descriptor.from_json(lr, f"manifest {digest} layer {i}")
            comp = LAYER_COMPRESSION.get(desc.media_type)
            if comp is None:
                raise UnsupportedMedia(desc.media_type)
            layers.append(Layer(desc, comp))
        return cls(digest, Descriptor.from_json(raw.get("config"), f"manifest {digest} config"),
                   tuple(layers))


@dataclass(frozen=True, slots=True)
class ImageConfig:
    digest: str
    diff_ids: tuple[str, ...]
    architecture: str
    os: str

    @classmethod
    def parse(cls, digest: str, data: bytes) -> ImageConfig:
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"config {digest} is not JSON") from exc
        rootfs = raw.get("rootfs") if isinstance(raw, dict) else None
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
            raise InvalidArgument(f"config {digest}: rootfs.type is not 'layers'")
        diff_ids = rootfs.get("diff_ids")
        if not isinstance(diff_ids, list):
            raise InvalidArgument(f"config {digest}: rootfs.diff_ids missing")
        return cls(digest, tuple(check_digest(str(d)) for d in diff_ids),
                   str(raw.get("architecture", "")), str(raw.get("os", "")))


class ImageSource(Protocol):
    """Where the builder gets an image from (a content store, an OCI layout...)."""

    def manifest(self, digest: str) -> Manifest: ...

    def config(self, manifest: Manifest) -> ImageConfig: ...

    def open_blob(self, digest: str) -> BinaryIO:
        """An unverified reader; the builder verifies digest and size while streaming."""
        ...


@runtime_checkable
class SelfVerifyingBlob(Protocol):
    """A reader from :meth:`ImageSource.open_blob` that checks what it delivered itself:
    :meth:`finish` reads to the end and raises unless exactly the blob (digest, size) was
    read. The builder then does not hash the blob a second time."""

    def read(self, n: int = -1, /) -> bytes: ...

    def finish(self) -> None: ...


@runtime_checkable
class SizeHints(Protocol):
    """Optional extra of an :class:`ImageSource`: a cheap guess of a layer's tar size
    (see :mod:`~kata_ipu.rootfs.sizehint`), used to size the image before building it."""

    def size_hint(self, layer: Layer) -> int | None: ...


class OciLayoutSource:
    """An OCI image-layout directory as an :class:`ImageSource`."""

    MAX_JSON = 4 * 1024 * 1024  # manifests/configs above this are refused (also a ttrpc limit)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def blob_path(self, digest: str) -> Path:
        _, _, hexd = check_digest(digest).partition(":")
        return self.path / "blobs" / "sha256" / hexd

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(digest) from exc

    def size_hint(self, layer: Layer) -> int | None:
        try:
            with open(self.blob_path(layer.digest), "rb") as f:
                return uncompressed_hint(f, layer.compression, layer.descriptor.size)
        except FileNotFoundError:
            return None

    def _read_json_blob(self, desc_digest: str, size: int | None) -> bytes:
        with self.open_blob(desc_digest) as f:
            data = f.read(self.MAX_JSON + 1)
        if len(data) > self.MAX_JSON or (size is not None and len(data) != size):
            raise BlobDigestMismatch(desc_digest, "(size differs)", size or -1, len(data))
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != desc_digest:
            raise BlobDigestMismatch(desc_digest, actual, size or len(data), len(data))
        return data

    def manifest(self, digest: str) -> Manifest:
        return Manifest.parse(digest, self._read_json_blob(digest, None))

    def config(self, manifest: Manifest) -> ImageConfig:
        cfg = manifest.config
        return ImageConfig.parse(cfg.digest, self._read_json_blob(cfg.digest, cfg.size))

    def resolve_ref(self, ref: str) -> str:
        """Manifest digest for ``org.opencontainers.image.ref.name`` == ref in index.json."""
        index = json.loads((self.path / "index.json").read_text())
        for m in index.get("manifests", []):
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref:
                return check_digest(m["digest"])
        raise BlobNotFound(f"ref {ref!r}")
