"""The ipu snapshotter's small parts: containerd's filter syntax, chain ids, the files the
shim proxy reads, and its configuration."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kata_ipu.errors import InvalidArgument
from shim_hooks.snapshotter import chain
from shim_hooks.snapshotter import config as snapcfg
from shim_hooks.snapshotter.filters import matcher, parse
from shim_hooks.snapshotter.model import Info, Kind, chain_id
from shim_hooks.snapshotter.remote import LayerRequest

REF = "containerd.io/snapshot.ref"


def _info(name: str, parent: str = "", kind: Kind = Kind.COMMITTED, **labels: str) -> Info:
    return Info(name, parent, kind, 0.0, 0.0, dict(labels))


def test_the_filter_containerds_metadata_layer_sends_finds_a_remote_snapshot() -> None:
    # metadata/snapshot.go: fmt.Sprintf(`labels."containerd.io/snapshot.ref"==%s,parent==%q`)
    remote = _info("ipu/1/sha256:bb", "ns/3/sha256:aa", **{REF: "sha256:bb"})
    first = _info("ipu/2/sha256:aa", "", **{REF: "sha256:aa"})
    match = matcher(['labels."containerd.io/snapshot.ref"==sha256:bb,parent=="ns/3/sha256:aa"'])
    assert match(remote) and not match(first)
    root = matcher(['labels."containerd.io/snapshot.ref"==sha256:aa,parent==""'])
    assert root(first) and not root(remote)


def test_filters_or_across_the_list_and_and_within_one() -> None:
    a = _info("a", kind=Kind.ACTIVE, l="1")
    v = _info("v", "a", kind=Kind.VIEW, l="2")
    assert [x.name for x in (a, v) if matcher(["kind==active", "kind==view"])(x)] == ["a", "v"]
    assert [x.name for x in (a, v) if matcher(["labels.l,parent!=\"\""])(x)] == ["v"]
    assert [x.name for x in (a, v) if matcher(["labels.l~=^[12]$,name~=v"])(x)] == ["v"]
    assert matcher([])(a) and not matcher(["labels.missing"])(a)
    for bad in ('labels."open', "kind=active", "name~=(", ",x"):
        with pytest.raises(InvalidArgument, match="filter"):
            parse(bad)


def test_chain_ids_follow_the_oci_definition() -> None:
    d1, d2, d3 = ("sha256:" + hashlib.sha256(x).hexdigest() for x in (b"1", b"2", b"3"))
    c2 = "sha256:" + hashlib.sha256(f"{d1} {d2}".encode()).hexdigest()
    assert chain_id([d1]) == d1 and chain_id([d1, d2]) == c2
    assert chain_id([d1, d2, d3]) == "sha256:" + hashlib.sha256(f"{c2} {d3}".encode()).hexdigest()


def test_a_layer_request_pins_the_tag_to_the_resolved_digest() -> None:
    labels = {REF: "sha256:c", "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/a/b:v1",
              "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "m" * 64,
              "containerd.io/snapshot/cri.layer-digest": "sha256:l"}
    req = LayerRequest.of(labels)
    assert req is not None and req.reference == "127.0.0.1:5000/a/b@sha256:" + "m" * 64
    assert LayerRequest.of({REF: "sha256:c"}) is None  # no CRI labels: a local layer


def test_the_proxy_finds_the_image_of_a_rootfs_that_is_one_lower(tmp_path: Path) -> None:
    image = chain.ChainImage("r/x@sha256:" + "a" * 64, "sha256:" + "a" * 64, 2, 3)
    lower = chain.lower_dir(tmp_path, 7)
    (lower / "fs").mkdir(parents=True)
    chain.write_lower(lower, image)
    fs = str(lower / "fs")
    overlay = ("overlay", "overlay", ("index=off", "workdir=/w", "upperdir=/u", f"lowerdir={fs}"))
    assert chain.image_of_mounts(tmp_path, [overlay]) == image
    assert image.prepare_layers == 2
    assert chain.image_of_mounts(tmp_path, [("bind", fs, ("ro", "rbind"))]) == image
    for not_one_lower in ([("overlay", "overlay", (f"lowerdir=/l/1/fs:{fs}",))],
                          [("bind", fs, ("rw", "rbind"))], [overlay, overlay],
                          [("overlay", "overlay", ("lowerdir=/elsewhere/lowers/7/fs",))]):
        assert chain.image_of_mounts(tmp_path, not_one_lower) is None
    (tmp_path / chain.HINTS_DIR).mkdir()  # the snapshotter makes it at its start
    chain.write_hint(tmp_path, "k8s.io", "c1", 7, image)
    assert chain.read_hint(tmp_path, "k8s.io", "c1") == image
    assert chain.read_hint(tmp_path, "default", "c1") is None
    chain.remove_hint(tmp_path, "k8s.io", "c1")
    assert chain.read_hint(tmp_path, "k8s.io", "c1") is None
    assert chain.split_backend_key("k8s.io/12/abc/def") == ("k8s.io", "abc/def")
    assert chain.split_backend_key("ipu/x/sha256:aa") is None


def test_config_file_env_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('root = "/srv/sn"\nfallback = "never"\npull_timeout = 60\n')
    cfg = snapcfg.load(str(path), env={"KATA_IPU_ADDRESS": "tcp://10.0.0.2:7000"},
                       address="/run/x.sock")
    assert cfg.root == Path("/srv/sn") and cfg.fallback == "never" and cfg.pull_timeout == 60
    assert cfg.ipu_address == "tcp://10.0.0.2:7000" and cfg.address == Path("/run/x.sock")
    path.write_text('rooot = "/x"\n')
    with pytest.raises(InvalidArgument, match="unknown key"):
        snapcfg.load(str(path), env={})
    path.write_text('fallback = "sometimes"\n')
    with pytest.raises(InvalidArgument, match="fallback must be"):
        snapcfg.load(str(path), env={})
    with pytest.raises(InvalidArgument, match="no such configuration file"):
        snapcfg.load(str(tmp_path / "missing.toml"), env={})
