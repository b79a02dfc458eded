"""The cold-prepare pipeline: kata-ipud builds the base while the layers still download.

Real registry, real daemon, real loop devices; umoci's unpack of the same image is the
reference for the tree, and the kernel's view (/proc/mounts, /sys/block) the oracle for
leftovers. A layer corrupted in the middle of its bytes (a stored-block gzip stays parseable
until its CRC) is the case that proves the build reads unverified bytes only provisionally.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu import api, errors
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.image.pull import Puller
from kata_ipu.image.reference import parse_reference
from kata_ipu.image.registry import RegistryClient
from kata_ipu.oci.manifest import Descriptor
from kata_ipu.rootfs.mount import mounted
from kata_ipu.testing import treecmp
from kata_ipu.testing.daemon import IpuDaemon, running
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer, push
from kata_ipu.ttrpc import Client
from tests.support.images import zoo_layers

PAYLOAD = 8 << 20  # big enough that the build really overlaps the download


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryServer, Path]]:
    """A registry with images "good" and "bad" (the same shape), and umoci's unpack of good."""
    require_root()
    require_programs("docker-registry", "skopeo", "umoci", "mkfs.ext4", "mkfs.xfs")
    work = tmp_path_factory.mktemp("pipeline")
    with RegistryServer(work / "reg") as reg:
        layout = OciLayout(work / "oci")
        base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
        for tag in ("good", "bad"):
            payload = LayerBuilder().file("srv/payload.bin", os.urandom(PAYLOAD)).build()
            layout.add_image([base, *zoo_layers(), payload], ref=tag)
            push(work / "oci", tag, f"{reg.address}/pipe/img:{tag}")
        bundle = work / "bundle"
        subprocess.run(["umoci", "unpack", "--image", f"{work / 'oci'}:good", str(bundle)],
                       check=True, capture_output=True)
        yield reg, bundle / "rootfs"


@pytest.fixture
def daemon(tmp_path: Path, world: tuple[RegistryServer, Path]) -> Iterator[IpuDaemon]:
    (tmp_path / "ipud").mkdir()
    with running(tmp_path / "ipud", pool_size="2G") as d:
        yield d


def _prepare(d: IpuDaemon, cid: str, image: str) -> pb.PrepareResponse:
    async def call() -> pb.PrepareResponse:
        async with await Client.connect(d.address) as c:
            resp: pb.PrepareResponse = await c.call_message(
                api.ROOTFS_SERVICE, "Prepare", pb.PrepareRequest(container_id=cid, image=image),
                pb.PrepareResponse, timeout=300)
            return resp
    return asyncio.run(call())


def _log_lines(d: IpuDaemon, msg: str) -> list[dict[str, object]]:
    out = []
    for line in d.log.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("msg") == msg:
                out.append(rec)
    return out


def _largest_layer(reg: RegistryServer, ref: str) -> Descriptor:
    r = parse_reference(ref)
    client = _client(reg, r.registry)
    manifest = json.loads(client.resolve(r).data)
    biggest = max(manifest["layers"], key=lambda layer: layer["size"])
    return Descriptor(biggest["mediaType"], biggest["digest"], biggest["size"])


def _client(reg: RegistryServer, registry: str) -> RegistryClient:
    # the store is not used for registry requests
    return Puller(None, insecure_registries=(reg.address,)).client(registry)  # type: ignore[arg-type]


def test_streaming_cold_prepare_builds_what_umoci_unpacks(
        daemon: IpuDaemon, world: tuple[RegistryServer, Path], tmp_path: Path) -> None:
    reg, reference = world
    ref = f"{reg.address}/pipe/img:good"
    resp = _prepare(daemon, "c1", ref)
    assert resp.cold
    pulled = _log_lines(daemon, "image pulled")
    assert pulled and pulled[-1]["streaming_build"] is True  # the pipeline really ran
    built = _log_lines(daemon, "base built")[-1]
    stages = built["stages"]
    assert isinstance(stages, dict) and "apply" in stages and "resize" in stages
    prepared = _log_lines(daemon, "rootfs prepared")[-1]
    assert {"pull_seconds", "base_seconds", "clone_export_seconds"} <= prepared.keys()

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(resp.rootfs.device.path, mnt, fstype="ext4"):
        tree = treecmp.snapshot(mnt, ignore=("lost+found",))
    assert treecmp.diff(treecmp.snapshot(reference), tree, skip_root_meta=True) == []

    # the store holds exactly the verified blobs, no partial ingest
    content = daemon.root / "content"
    for blob in (content / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert not list((content / "ingest").glob("*.data"))
    # a second container of the image is warm: same base, no new build
    again = _prepare(daemon, "c2", ref)
    assert not again.cold and len(_log_lines(daemon, "base built")) == 1


def test_layer_corrupted_mid_stream_leaves_nothing_and_the_daemon_serves(
        daemon: IpuDaemon, world: tuple[RegistryServer, Path], tmp_path: Path) -> None:
    reg, _reference = world
    ref = f"{reg.address}/pipe/img:bad"
    layer = _largest_layer(reg, ref)
    stored = reg.blob_file(layer.digest)
    original = stored.read_bytes()
    # Random data gzips to stored blocks: a flipped byte in the middle keeps the stream
    # parseable, so the build applies most of the layer before anything can notice.
    middle = len(original) // 2
    stored.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF])
                       + original[middle + 1:])
    try:
        with pytest.raises(errors.DataLoss, match="digest mismatch") as info:
            _prepare(daemon, "victim", ref)
        assert layer.digest in str(info.value)  # the pull's own error, as without streaming
        # nothing left: no image, no base, no partial file, no mount, no loop device
        assert json.loads(daemon.cli("images", "--json").stdout) == []
        assert json.loads(daemon.cli("ls", "--json").stdout) == []
        data = daemon.root / "block" / "data"
        assert not [p for p in data.rglob("*") if p.is_file()]  # no base, no partial image
        assert str(data / "build") not in Path("/proc/mounts").read_text()
        assert daemon.volume_loops() == []
        assert not any(p.name == layer.digest.partition(":")[2]
                       for p in (daemon.root / "content").rglob("*"))
        assert not list((daemon.root / "content" / "ingest").glob("*.data"))
        assert any(r.get("msg") == "rootfs build failed, cleaned up"
                   for r in map(json.loads, filter(lambda s: s.startswith("{"),
                                                   daemon.log.read_text().splitlines())))
    finally:
        stored.write_bytes(original)
    # the daemon keeps serving, and the same image now prepares cleanly
    ok = _prepare(daemon, "after", ref)
    assert ok.cold and Path(ok.rootfs.device.path).exists()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(ok.rootfs.device.path, mnt, fstype="ext4"):
        assert (mnt / "srv/payload.bin").stat().st_size == PAYLOAD


def test_blob_tail_is_a_ranged_read_of_the_registry(world: tuple[RegistryServer, Path]) -> None:
    reg, _reference = world
    ref = f"{reg.address}/pipe/img:good"
    layer = _largest_layer(reg, ref)
    client = _client(reg, parse_reference(ref).registry)
    tail = client.fetch_blob_tail("pipe/img", layer, 4)
    assert tail == reg.blob_file(layer.digest).read_bytes()[-4:]
    big = Descriptor(layer.media_type, layer.digest, 1 << 40)  # a range it cannot serve
    assert client.fetch_blob_tail("pipe/img", big, 4) is None
