"""Bring images into the store without a registry.

* :func:`import_oci_layout` copies images from an OCI image-layout directory (``skopeo copy …
  oci:DIR:ref``, ``umoci``, buildah, ``docker save`` of Docker ≥ 25);
* :func:`import_docker_archive` reads a ``docker save`` / ``skopeo copy … docker-archive:``
  tarball (``manifest.json`` + config + layer tars) and converts it to an OCI manifest.

Every blob goes through an :class:`~kata_ipu.content.ingest.IngestWriter`, so it is verified
(size and digest) before it is visible; on error nothing half-imported remains in ``blobs/``
(unreferenced, already verified blobs may remain and are collected by GC).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kata_ipu.content.errors import DigestMismatch, InvalidLayout
from kata_ipu.content.ingest import IngestWriter
from kata_ipu.content.store import ContentStore
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.digest import new_hasher, split_digest
from kata_ipu.oci.manifest import (
    Descriptor,
    Index,
    Manifest,
    children,
    parse_any,
    parse_config,
    parse_descriptor,
)

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ImportedImage:
    name: str
    descriptor: Descriptor


def _copy_stream(store: ContentStore, desc: Descriptor, src: IO[bytes]) -> None:
    def fill(w: IngestWriter) -> None:
        w.restart()
        while chunk := src.read(_CHUNK):
            w.write(chunk)

    store.ingest_blocking(desc, fill)


def _copy_file(store: ContentStore, desc: Descriptor, path: Path) -> None:
    if store.has(desc.digest):
        return
    try:
        with open(path, "rb") as src:
            _copy_stream(store, desc, src)
    except FileNotFoundError as exc:
        raise InvalidLayout(f"blob {desc.digest} referenced but missing: {path}") from exc


def _copy_tree(store: ContentStore, desc: Descriptor,
               open_blob: Callable[[Descriptor], Path]) -> None:
    """Copy ``desc`` and everything below it, children first."""
    if desc.media_type in mt.INDEX_TYPES | mt.MANIFEST_TYPES:
        path = open_blob(desc)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise InvalidLayout(f"manifest {desc.digest} missing: {path}") from exc
        node: Manifest | Index = parse_any(data, media_type=desc.media_type,
                                           where=f"{desc.digest} ({path})")
        for child in children(node):
            if isinstance(node, Index) and not Path(open_blob(child)).exists():
                continue  # partial multi-platform copies are normal (skopeo copy one arch)
            _copy_tree(store, child, open_blob)
    _copy_file(store, desc, open_blob(desc))


def import_oci_layout(store: ContentStore, src: str | os.PathLike[str], *,
                      ref: str | None = None, name: str | None = None) -> list[ImportedImage]:
    """Import images tagged in the layout at ``src`` (only ``ref`` if given).

    Each image is tagged ``name`` (when importing one) or its original ref name.
    """
    src = Path(src)
    try:
        layout = json.loads((src / "oci-layout").read_text())
        index = json.loads((src / "index.json").read_text())
    except FileNotFoundError as exc:
        raise InvalidLayout(f"{src} is not an OCI image layout: {exc.filename} missing") from exc
    except ValueError as exc:
        raise InvalidLayout(f"{src}: invalid JSON in oci-layout or index.json ({exc})") from exc
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise InvalidLayout(f"{src}/oci-layout lacks imageLayoutVersion")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidLayout(f"{src}/index.json has no 'manifests' list")
    descs = [parse_descriptor(m, f"{src}/index.json") for m in index["manifests"]]
    if ref is not None:
        descs = [d for d in descs if d.annotations.get(mt.REF_NAME) == ref]
        if not descs:
            raise InvalidLayout(f"{src} has no image named {ref!r}")

    def blob(desc: Descriptor) -> Path:
        algo, hexd = split_digest(desc.digest)
        return src / "blobs" / algo / hexd

    out = []
    for desc in descs:
        _copy_tree(store, desc, blob)
        tag = name or desc.annotations.get(mt.REF_NAME)
        if tag is None:
            continue
        clean = {k: v for k, v in desc.annotations.items() if k != mt.REF_NAME}
        tagged = store.tag(tag, Descriptor(desc.media_type, desc.digest, desc.size, clean,
                                           desc.platform))
        out.append(ImportedImage(tag, tagged))
    return out


def _member(tar: tarfile.TarFile, name: str, where: Path) -> IO[bytes]:
    try:
        member = tar.getmember(name.lstrip("./") if name.startswith("./") else name)
    except KeyError as exc:
        raise InvalidLayout(f"{where}: {name!r} is listed but not in the archive") from exc
    f = tar.extractfile(member)
    if f is None:
        raise InvalidLayout(f"{where}: {name!r} is not a regular file")
    return f


def _hash_member(tar: tarfile.TarFile, name: str, where: Path) -> tuple[str, int]:
    hasher = new_hasher("sha256:" + "0" * 64)
    size = 0
    with _member(tar, name, where) as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return f"sha256:{hasher.hexdigest()}", size


def _sniff_layer(tar: tarfile.TarFile, name: str, where: Path) -> str:
    with _member(tar, name, where) as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return mt.OCI_LAYER_GZIP
    if head == b"\x28\xb5\x2f\xfd":
        return mt.OCI_LAYER_ZSTD
    return mt.OCI_LAYER


def import_docker_archive(store: ContentStore, archive: str | os.PathLike[str], *,
                          name: str | None = None) -> list[ImportedImage]:
    """Import a ``docker save`` / ``docker-archive:`` tarball; images are tagged with their
    ``RepoTags`` (or ``name`` when given, for a single-image archive)."""
    archive = Path(archive)
    try:
        tar = tarfile.open(archive, "r:")  # noqa: SIM115 - closed by the with below
    except (FileNotFoundError, tarfile.TarError) as exc:
        raise InvalidLayout(f"{archive} is not a readable tar archive: {exc}") from exc
    with tar:
        out = []
        for entry in _archive_entries(tar, archive):
            out.extend(_import_archive_entry(store, tar, archive, entry, name))
        return out


def _archive_entries(tar: tarfile.TarFile, archive: Path) -> list[dict[str, Any]]:
    """The checked entries of a docker archive's ``manifest.json``."""
    names = set(tar.getnames())
    if "manifest.json" not in names:
        raise InvalidLayout(f"{archive} has no manifest.json (not a docker archive)")
    with _member(tar, "manifest.json", archive) as f:
        try:
            entries: Any = json.load(f)
        except ValueError as exc:
            raise InvalidLayout(f"{archive}: manifest.json is not valid JSON") from exc
    if not isinstance(entries, list) or not entries:
        raise InvalidLayout(f"{archive}: manifest.json must be a non-empty list")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or \
                not isinstance(entry.get("Layers"), list):
            raise InvalidLayout(f"{archive}: manifest.json entry needs Config and Layers")
    return entries


def _import_archive_entry(store: ContentStore, tar: tarfile.TarFile, archive: Path,
                          entry: dict[str, Any], name: str | None) -> list[ImportedImage]:
    """Import one image of a docker archive as an OCI manifest, and tag it."""
    with _member(tar, entry["Config"], archive) as f:
        config_bytes = f.read()
    config = parse_config(config_bytes, where=f"{archive}:{entry['Config']}")
    if len(config.diff_ids) != len(entry["Layers"]):
        raise InvalidLayout(
            f"{archive}: {len(entry['Layers'])} layers but config has "
            f"{len(config.diff_ids)} diff_ids"
        )
    layers = []
    for layer_name, diff_id in zip(entry["Layers"], config.diff_ids, strict=True):
        digest, size = _hash_member(tar, layer_name, archive)
        desc = Descriptor(_sniff_layer(tar, layer_name, archive), digest, size)
        if desc.media_type == mt.OCI_LAYER and digest != diff_id:
            raise DigestMismatch(diff_id, digest,
                                 where=f"{archive}:{layer_name} vs config diff_id")
        if not store.has(digest):
            with _member(tar, layer_name, archive) as f:
                _copy_stream(store, desc, f)
        layers.append(desc)
    cfg = store.write_blob(config_bytes, mt.OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": cfg.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    mdesc = store.write_blob(json.dumps(manifest, sort_keys=True).encode(), mt.OCI_MANIFEST)
    tags = [name] if name else [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
    if not tags:
        tags = [mdesc.digest]
    return [ImportedImage(tag, store.tag(tag, mdesc)) for tag in tags]
