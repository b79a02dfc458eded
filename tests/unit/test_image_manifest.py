"""Manifest parsing (bad input, schema1, encryption, media types) and platform selection."""

from __future__ import annotations

import json

import pytest

from kata_ipu.image.pull import PlatformNotFound, select_platform
from kata_ipu.oci import mediatypes as mt
from kata_ipu.oci.manifest import (
    EncryptedLayerUnsupported,
    Index,
    InvalidManifest,
    Manifest,
    Schema1Unsupported,
    UnsupportedMediaType,
    parse_any,
    parse_config,
)
from kata_ipu.oci.platform import Platform, match_rank

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def manifest(layer_type=mt.OCI_LAYER_GZIP, config_type=mt.OCI_CONFIG, **extra):
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
           "config": {"mediaType": config_type, "digest": D1, "size": 10},
           "layers": [{"mediaType": layer_type, "digest": D2, "size": 20}], **extra}
    return json.dumps(doc).encode()


def entry(digest, arch, variant=None, **ann):
    p = {"os": "linux", "architecture": arch}
    if variant:
        p["variant"] = variant
    out = {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": 1, "platform": p}
    if ann:
        out["annotations"] = ann
    return out


def test_parses_oci_and_docker_manifests():
    m = parse_any(manifest())
    assert isinstance(m, Manifest) and m.layers[0].digest == D2
    docker = json.loads(manifest(mt.DOCKER_LAYER_GZIP, mt.DOCKER_CONFIG))
    docker["mediaType"] = mt.DOCKER_MANIFEST
    assert parse_any(json.dumps(docker).encode()).media_type == mt.DOCKER_MANIFEST
    for layer in (mt.OCI_LAYER, mt.OCI_LAYER_ZSTD, mt.DOCKER_LAYER_GZIP):
        assert parse_any(manifest(layer)).layers[0].media_type == layer


@pytest.mark.parametrize(("data", "error", "text"), [
    (b"{not json", InvalidManifest, "not valid JSON"),
    (b"[1,2]", InvalidManifest, "expected a JSON object"),
    (manifest(mt.OCI_LAYER + "+lz4"), UnsupportedMediaType, r"tar\+lz4.*layer sha256:2222"),
    (manifest(config_type="application/x-weird"), UnsupportedMediaType, "x-weird"),
    (manifest(mt.OCI_LAYER_GZIP + "+encrypted"), EncryptedLayerUnsupported, "encrypted"),
    (json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode(),
     Schema1Unsupported, "schema1"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/x-thing"}).encode(),
     UnsupportedMediaType, "x-thing"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                 "config": {"mediaType": mt.OCI_CONFIG, "digest": "sha256:zz", "size": 1},
                 "layers": []}).encode(), InvalidManifest, "invalid digest"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                 "config": {"mediaType": mt.OCI_CONFIG, "digest": D1, "size": -1},
                 "layers": []}).encode(), InvalidManifest, "invalid size"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX}).encode(),
     InvalidManifest, "manifests"),
])
def test_bad_manifests_have_clear_errors(data, error, text):
    with pytest.raises(error, match=text):
        parse_any(data, where="test-manifest")


def test_schema1_content_type_rejected():
    with pytest.raises(Schema1Unsupported):
        parse_any(b'{"schemaVersion": 2}', media_type=mt.DOCKER_SCHEMA1_SIGNED)


def test_config_requires_diff_ids():
    with pytest.raises(InvalidManifest, match="diff_ids"):
        parse_config(b'{"os": "linux", "architecture": "amd64"}')
    cfg = parse_config(json.dumps({"os": "linux", "architecture": "arm", "variant": "v7",
                                   "rootfs": {"type": "layers", "diff_ids": [D1]},
                                   "config": {"Env": ["A=1"], "Cmd": ["sh"]}}).encode())
    assert cfg.platform == Platform("linux", "arm", "v7") and cfg.diff_ids == (D1,)
    assert cfg.env == ("A=1",) and cfg.cmd == ("sh",)


def index(*entries):
    out = parse_any(json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                                "manifests": list(entries)}).encode())
    assert isinstance(out, Index)
    return out


def test_platform_selection_with_arm_fallbacks_and_attestations():
    idx = index(entry(D1, "amd64"), entry(D2, "arm", "v6"), entry(D3, "arm64"),
                {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "4" * 64, "size": 1,
                 "platform": {"os": "unknown", "architecture": "unknown"},
                 "annotations": {mt.DOCKER_REFERENCE_TYPE: "attestation-manifest"}})
    assert select_platform(idx, Platform("linux", "amd64"), "i").digest == D1
    assert select_platform(idx, Platform("linux", "arm64", "v8"), "i").digest == D3
    assert select_platform(idx, Platform("linux", "aarch64"), "i").digest == D3
    # arm/v7 hosts run v6 images when no v7 exists.
    assert select_platform(idx, Platform("linux", "arm", "v7"), "i").digest == D2
    with pytest.raises(PlatformNotFound, match=r"linux/riscv64.*available: linux/amd64"):
        select_platform(idx, Platform("linux", "riscv64"), "i")
    both = index(entry(D1, "arm", "v6"), entry(D2, "arm", "v7"))
    assert select_platform(both, Platform("linux", "arm", "v7"), "i").digest == D2
    with pytest.raises(PlatformNotFound):
        select_platform(index(entry(D2, "arm", "v7")), Platform("linux", "arm", "v6"), "i")


def test_match_rank_requires_same_os_and_arch():
    assert match_rank(Platform("linux", "amd64"), Platform("windows", "amd64")) is None
    assert match_rank(Platform("linux", "x86_64"), Platform("linux", "amd64")) == 0
