"""Import from an OCI layout directory and from docker-archive tarballs made by skopeo;
skopeo and umoci read the result back."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

import pytest

from kata_ipu.content.errors import InvalidLayout
from kata_ipu.content.importer import import_docker_archive, import_oci_layout
from kata_ipu.content.store import ContentStore
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    require_programs("skopeo", "umoci", "busybox")
    root = tmp_path_factory.mktemp("src")
    tree = busybox_tree(root / "tree")
    lay = OciLayout(root / "layout")
    base = LayerBuilder().tree(tree).build()
    top = LayerBuilder().file("hello.txt", b"hello\n").build()
    img = lay.add_image([base, top], ref="bb")
    lay.add_image([top], ref="small", compression="zstd")
    return root / "layout", tree, img


def unpack(tmp_path, store: ContentStore, name: str):
    bundle = tmp_path / f"bundle-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{store.root}:{name}",
                    str(bundle)], check=True, capture_output=True)
    return bundle / "rootfs"


def test_import_oci_layout(layout, tmp_path):
    src, tree, img = layout
    store = ContentStore.open(tmp_path / "store")
    out = import_oci_layout(store, src)
    assert sorted(i.name for i in out) == ["bb", "small"]
    assert store.resolve("bb").digest == img.manifest.digest
    rootfs = unpack(tmp_path, store, "bb")
    assert (rootfs / "hello.txt").read_bytes() == b"hello\n"
    assert (rootfs / "bin/busybox").read_bytes() == (tree / "bin/busybox").read_bytes()
    one = ContentStore.open(tmp_path / "one")
    assert [i.name for i in import_oci_layout(one, src, ref="bb", name="x/y:1")] == ["x/y:1"]
    with pytest.raises(InvalidLayout, match="no image named 'nope'"):
        import_oci_layout(one, src, ref="nope")


def test_import_docker_archive_from_skopeo(layout, tmp_path):
    src, tree, img = layout
    archive = tmp_path / "bb.tar"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{src}:bb",
                    f"docker-archive:{archive}:example.com/bb:v1"], check=True,
                   capture_output=True)
    store = ContentStore.open(tmp_path / "store")
    out = import_docker_archive(store, archive)
    assert [i.name for i in out] == ["example.com/bb:v1"]
    config = store.read_config(out[0].descriptor.digest)
    assert config.diff_ids == img.diff_ids  # same uncompressed layers as the source
    info = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{store.root}:example.com/bb:v1"],
                                     check=True, capture_output=True).stdout)
    assert len(info["Layers"]) == 2
    rootfs = unpack(tmp_path, store, "example.com/bb:v1")
    assert (rootfs / "hello.txt").read_bytes() == b"hello\n"
    assert (rootfs / "bin/busybox").read_bytes() == (tree / "bin/busybox").read_bytes()


def test_bad_archives_have_clear_errors_and_leave_no_blobs(tmp_path):
    store = ContentStore.open(tmp_path / "store")
    with pytest.raises(InvalidLayout, match="not a readable tar"):
        import_docker_archive(store, tmp_path / "missing.tar")
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        tar.add(__file__, arcname="something.txt")
    with pytest.raises(InvalidLayout, match=r"no manifest\.json"):
        import_docker_archive(store, bad)
    (tmp_path / "notlayout").mkdir()
    with pytest.raises(InvalidLayout, match="oci-layout missing"):
        import_oci_layout(store, tmp_path / "notlayout")
    assert store.all_blobs() == [] and store.images() == []
