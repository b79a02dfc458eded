"""What the front doors read from a bundle: image, sandbox skip, export, volume key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim_hooks import bundle
from shim_hooks.snapshotter.chain import ChainImage


def _spec(**ann: str) -> dict[str, object]:
    return {"ociVersion": "1.0.2", "root": {"path": "/abs/rootfs"}, "annotations": ann}


def test_the_chain_wins_then_the_kata_ipu_annotation_then_a_pinned_cri_name() -> None:
    pinned = "reg/a@sha256:" + "a" * 64
    chain = ChainImage("reg/c@sha256:" + "c" * 64, "sha256:" + "c" * 64, 2, 3)
    both = _spec(**{"io.kubernetes.cri.image-name": pinned,
                    "io.katacontainers.ipu.image": "reg/b:1"})
    p = bundle.plan(both, "host-block", chain)
    assert (p.image, p.layers, p.keep) == (chain.reference, 2, False)
    whole = ChainImage(chain.reference, chain.manifest, 3, 3)
    assert bundle.plan(both, "host-block", whole).layers == 0  # all of them: the image's base
    p = bundle.plan(both, "host-block")
    assert (p.image, p.export) == ("reg/b:1", "host-block")
    p = bundle.plan(_spec(**{"io.katacontainers.ipu.image": "reg/b:1",
                             "io.katacontainers.ipu.export": "vhost-user-blk"}), "host-block")
    assert (p.image, p.export) == ("reg/b:1", "vhost-user-blk")
    p = bundle.plan(_spec(**{"io.kubernetes.cri.image-name": pinned}), "host-block")
    assert (p.image, p.keep) == (pinned, False)


def test_a_cri_tag_is_not_resolved_again_the_rootfs_is_kept() -> None:
    p = bundle.plan(_spec(**{"io.kubernetes.cri.container-type": "container",
                             "io.kubernetes.cri.image-name": "reg/a:1"}), "host-block")
    assert p.image is None and p.keep and "not pinned by digest" in p.reason


def test_sandbox_and_imageless_containers_are_left_alone() -> None:
    p = bundle.plan(_spec(**{"io.kubernetes.cri.container-type": "sandbox",
                             "io.kubernetes.cri.image-name": "pause:3.9"}), "host-block")
    assert p.image is None and p.keep and "sandbox" in p.reason
    p = bundle.plan({"ociVersion": "1.0.2"}, "host-block")
    assert p.image is None and not p.keep and "io.katacontainers.ipu.image" in p.reason


def test_volume_key_is_readable_when_valid_and_hashed_otherwise() -> None:
    assert bundle.volume_key("k8s.io", "a" * 64) == "k8s.io." + "a" * 64
    hashed = bundle.volume_key("ns", "x/y z")
    assert hashed.startswith("h.") and len(hashed) == 66
    assert bundle.volume_key("ns", "x" * 200) != bundle.volume_key("ns", "x" * 201)


def test_set_root_path_and_records(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_spec()))
    assert bundle.set_root_path(tmp_path, "rootfs") == "/abs/rootfs"
    assert bundle.read_spec(tmp_path)["root"] == {"path": "rootfs"}
    bundle.write_json(tmp_path / bundle.VOLUME_RECORD, {"key": "k"})
    assert bundle.read_json(tmp_path / bundle.VOLUME_RECORD) == {"key": "k"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    bundle.remove(tmp_path / bundle.VOLUME_RECORD)
    bundle.remove(tmp_path / bundle.VOLUME_RECORD)  # idempotent
    assert bundle.read_json(tmp_path / bundle.VOLUME_RECORD) is None


def test_missing_or_broken_config_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(bundle.BundleError, match="no OCI config"):
        bundle.read_spec(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(bundle.BundleError, match="unreadable"):
        bundle.read_spec(tmp_path)
