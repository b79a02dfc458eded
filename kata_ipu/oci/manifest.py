"""Typed OCI / Docker schema2 objects: Descriptor, Manifest, Index, ImageConfig.

Raw JSON is turned into these frozen dataclasses at the boundary (:func:`parse_manifest`,
:func:`parse_index`, :func:`parse_config`, :func:`parse_any`); nothing above this module sees a
``dict``. Errors name the object (digest or source) and the offending field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kata_ipu.errors import InvalidArgument, Unimplemented
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.digest import InvalidDigest, validate_digest
from kata_ipu.oci.platform import Platform


class InvalidManifest(InvalidArgument):
    """A manifest, index or config is not valid JSON or misses a required field."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"invalid manifest {where}: {why}")
        self.where = where


class UnsupportedMediaType(Unimplemented):
    def __init__(self, media_type: str, where: str) -> None:
        super().__init__(f"unsupported media type {media_type!r} for {where}")
        self.media_type = media_type


class Schema1Unsupported(Unimplemented):
    def __init__(self, where: str) -> None:
        super().__init__(
            f"{where} is a Docker schema1 manifest, which is deprecated and not supported; "
            "re-push the image with a current client (schema2 or OCI)"
        )


class EncryptedLayerUnsupported(Unimplemented):
    def __init__(self, media_type: str, digest: str) -> None:
        super().__init__(
            f"layer {digest} is encrypted ({media_type}); kata-ipu cannot decrypt ocicrypt "
            "layers (pull it with a CoCo guest-pull or decrypt it first)"
        )
        self.media_type = media_type
        self.digest = digest


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type, "digest": self.digest, "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            p: dict[str, Any] = {"architecture": self.platform.architecture,
                                 "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            if self.platform.os_version:
                p["os.version"] = self.platform.os_version
            if self.platform.os_features:
                p["os.features"] = list(self.platform.os_features)
            out["platform"] = p
        return out

    @property
    def is_attestation(self) -> bool:
        return mt.DOCKER_REFERENCE_TYPE in self.annotations or (
            self.platform is not None
            and self.platform.os == "unknown"
            and self.platform.architecture == "unknown"
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest (OCI or Docker schema2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Index:
    """An image index / Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config kata-ipu uses (plus the raw process config)."""

    platform: Platform
    diff_ids: tuple[str, ...]
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created: str = ""


def _load(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidManifest(where, f"not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise InvalidManifest(where, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _str_map(value: Any, where: str, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidManifest(where, f"{name} must be an object of strings")
    return dict(value)


def _str_list(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidManifest(where, f"{name} must be a list of strings")
    return tuple(value)


def parse_platform_json(value: Any, where: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidManifest(where, "platform must be an object")
    os_, arch = value.get("os"), value.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str):
        raise InvalidManifest(where, "platform needs string 'os' and 'architecture'")
    variant = value.get("variant") or ""
    os_version = value.get("os.version") or ""
    if not isinstance(variant, str) or not isinstance(os_version, str):
        raise InvalidManifest(where, "platform variant/os.version must be strings")
    return Platform(os_, arch, variant, os_version,
                    _str_list(value.get("os.features"), where, "os.features"))


def parse_descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidManifest(where, "descriptor must be an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidManifest(where, "descriptor without mediaType")
    if not isinstance(digest, str):
        raise InvalidManifest(where, "descriptor without digest")
    try:
        validate_digest(digest)
    except InvalidDigest as exc:
        raise InvalidManifest(where, str(exc)) from exc
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(where, f"descriptor {digest} has invalid size {size!r}")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations=_str_map(value.get("annotations"), where, "annotations"),
        platform=parse_platform_json(value.get("platform"), where),
        urls=_str_list(value.get("urls"), where, "urls"),
    )


def detect_media_type(obj: Mapping[str, Any], declared: str | None, where: str) -> str:
    """The media type of a manifest-ish JSON object (header, field or shape)."""
    if obj.get("schemaVersion") == 1 or (declared or "") in mt.SCHEMA1_TYPES:
        raise Schema1Unsupported(where)
    field_mt = obj.get("mediaType")
    if field_mt is not None and not isinstance(field_mt, str):
        raise InvalidManifest(where, "mediaType must be a string")
    media_type = field_mt or declared or ""
    if not media_type or media_type in ("application/json", "text/plain"):
        media_type = mt.OCI_INDEX if "manifests" in obj else mt.OCI_MANIFEST
    if field_mt and declared and declared != field_mt and declared not in (
        "application/json", "text/plain", "application/octet-stream",
    ):
        raise InvalidManifest(
            where, f"Content-Type {declared!r} disagrees with mediaType {field_mt!r}"
        )
    if media_type in mt.SCHEMA1_TYPES:
        raise Schema1Unsupported(where)
    if media_type not in mt.INDEX_TYPES | mt.MANIFEST_TYPES:
        raise UnsupportedMediaType(media_type, where)
    return media_type


def _check_schema(obj: Mapping[str, Any], where: str) -> None:
    if obj.get("schemaVersion") != 2:
        raise InvalidManifest(where, f"schemaVersion must be 2, got {obj.get('schemaVersion')!r}")


def parse_any(data: bytes, *, media_type: str | None = None,
              where: str = "manifest") -> Manifest | Index:
    """Parse bytes that should be a manifest or an index (``media_type`` from the header)."""
    obj = _load(data, where)
    kind = detect_media_type(obj, media_type, where)
    _check_schema(obj, where)
    if kind in mt.INDEX_TYPES:
        manifests = obj.get("manifests")
        if not isinstance(manifests, list):
            raise InvalidManifest(where, "index without a 'manifests' list")
        return Index(kind, tuple(parse_descriptor(m, where) for m in manifests),
                     _str_map(obj.get("annotations"), where, "annotations"))
    config = parse_descriptor(obj.get("config"), f"{where} config")
    if config.media_type not in mt.CONFIG_TYPES:
        raise UnsupportedMediaType(config.media_type, f"{where} config")
    layers_raw = obj.get("layers")
    if not isinstance(layers_raw, list):
        raise InvalidManifest(where, "manifest without a 'layers' list")
    layers = tuple(parse_descriptor(layer, f"{where} layer") for layer in layers_raw)
    for layer in layers:
        if mt.is_encrypted(layer.media_type):
            raise EncryptedLayerUnsupported(layer.media_type, layer.digest)
        if layer.media_type not in mt.LAYER_COMPRESSION:
            raise UnsupportedMediaType(layer.media_type, f"{where} layer {layer.digest}")
    return Manifest(kind, config, layers, _str_map(obj.get("annotations"), where, "annotations"))


def parse_manifest(data: bytes, *, media_type: str | None = None,
                   where: str = "manifest") -> Manifest:
    out = parse_any(data, media_type=media_type, where=where)
    if not isinstance(out, Manifest):
        raise InvalidManifest(where, "expected an image manifest, got an index")
    return out


def parse_index(data: bytes, *, media_type: str | None = None, where: str = "index") -> Index:
    out = parse_any(data, media_type=media_type, where=where)
    if not isinstance(out, Index):
        raise InvalidManifest(where, "expected an index, got an image manifest")
    return out


def parse_config(data: bytes, *, where: str = "config") -> ImageConfig:
    obj = _load(data, where)
    plat = parse_platform_json(
        {k: obj[k] for k in ("os", "architecture", "variant", "os.version") if k in obj}, where
    )
    assert plat is not None
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidManifest(where, "config without rootfs.diff_ids")
    diff_ids = _str_list(rootfs["diff_ids"], where, "rootfs.diff_ids")
    for d in diff_ids:
        try:
            validate_digest(d)
        except InvalidDigest as exc:
            raise InvalidManifest(where, str(exc)) from exc
    proc = obj.get("config") or {}
    if not isinstance(proc, dict):
        raise InvalidManifest(where, "config.config must be an object")
    created = obj.get("created") or ""
    return ImageConfig(
        platform=plat,
        diff_ids=diff_ids,
        env=_str_list(proc.get("Env"), where, "Env"),
        entrypoint=_str_list(proc.get("Entrypoint"), where, "Entrypoint"),
        cmd=_str_list(proc.get("Cmd"), where, "Cmd"),
        working_dir=str(proc.get("WorkingDir") or ""),
        user=str(proc.get("User") or ""),
        labels=_str_map(proc.get("Labels"), where, "Labels"),
        created=created if isinstance(created, str) else "",
    )


def children(node: Manifest | Index) -> Sequence[Descriptor]:
    """Descriptors a manifest or index references (for GC and copying)."""
    if isinstance(node, Index):
        return node.manifests
    return (node.config, *node.layers)


_DOCKER_TO_OCI = {
    mt.DOCKER_CONFIG: mt.OCI_CONFIG,
    mt.DOCKER_LAYER: mt.OCI_LAYER,
    mt.DOCKER_LAYER_GZIP: mt.OCI_LAYER_GZIP,
    mt.DOCKER_LAYER_FOREIGN: mt.OCI_LAYER_ND_GZIP,
}


def to_oci_manifest(manifest: Manifest) -> bytes:
    """The OCI form of a Docker schema2 manifest (what ``skopeo copy … oci:`` writes).

    The mapping is 1:1 and deterministic, so the same source always yields the same digest;
    config and layer blobs are unchanged.
    """

    def conv(d: Descriptor) -> Descriptor:
        return Descriptor(_DOCKER_TO_OCI.get(d.media_type, d.media_type), d.digest, d.size,
                          d.annotations, None, d.urls)

    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": conv(manifest.config).to_json(),
        "layers": [conv(d).to_json() for d in manifest.layers],
    }
    if manifest.annotations:
        doc["annotations"] = dict(manifest.annotations)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
