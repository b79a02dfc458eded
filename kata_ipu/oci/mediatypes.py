"""Media types of OCI and Docker schema2 images, and how kata-ipu classifies them."""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

LAYER_COMPRESSION: dict[str, str] = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_ND: "none",
    OCI_LAYER_ND_GZIP: "gzip",
    OCI_LAYER_ND_ZSTD: "zstd",
    DOCKER_LAYER: "none",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_FOREIGN: "gzip",
}

ACCEPT_MANIFESTS = ", ".join(
    (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
)
"""``Accept`` header for manifest requests (schema1 deliberately absent)."""

REF_NAME = "org.opencontainers.image.ref.name"
"""index.json annotation naming an image in an OCI layout."""

DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"
"""Annotation marking buildx attestation manifests inside an index (ignored by platform match)."""


def is_encrypted(media_type: str) -> bool:
    return media_type.endswith("+encrypted")
