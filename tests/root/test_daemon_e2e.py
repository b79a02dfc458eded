"""kata-ipud end to end over its real socket: a real registry, real pool, real loop devices.

The daemon runs as its console script; clients are this project's ttrpc client and the
``kata-ipu`` CLI. The kernel's view (/proc/mounts, /sys/block/loop*) is the oracle.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu import api, errors
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.testing.daemon import IpuDaemon, running
from kata_ipu.testing.ocibuild import LayerBuilder
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer
from kata_ipu.ttrpc import Client
from tests.support.images import busybox_registry

CLI = str(Path(sys.executable).with_name("kata-ipu"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    require_root()
    require_programs("docker-registry", "skopeo", "mkfs.ext4", "mkfs.xfs")
    with busybox_registry(tmp_path_factory.mktemp("registry"), "e2e/busybox", {
            "v1": [LayerBuilder().file("etc/motd", b"kata-ipu e2e\n").build()],
            "v2": [LayerBuilder().file("etc/motd", b"other\n").build()]}) as reg:
        yield reg


@pytest.fixture
def daemon(tmp_path: Path, registry: RegistryServer) -> Iterator[IpuDaemon]:
    with running(tmp_path, pool_size="2G") as d:
        yield d




async def _call(d: IpuDaemon, service: str, method: str, req: object, resp: type) -> object:
    async with await Client.connect(d.address) as c:
        return await c.call_message(service, method, req, resp, timeout=300)  # type: ignore


def _mount_write_read(device: str, mnt: Path, name: str, data: str) -> set[str]:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", device, str(mnt)], check=True)
    try:
        assert f"{device} {mnt} ext4" in Path("/proc/mounts").read_text()
        assert (mnt / "etc/motd").read_text() == "kata-ipu e2e\n"
        (mnt / "root" / name).write_text(data)
        return {p.name for p in (mnt / "root").iterdir()}
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_pull_prepare_three_isolated_clones_release_gc(daemon: IpuDaemon,
                                                      registry: RegistryServer,
                                                      tmp_path: Path) -> None:
    ref = f"{registry.address}/e2e/busybox:v1"
    pulled = daemon.cli("pull", ref)
    assert "sha256:" in pulled.stdout and "ext4 base" in pulled.stdout
    images = json.loads(daemon.cli("images", "--json").stdout)
    assert [i["name"] for i in images] == [ref]
    assert len(images[0]["bases"]) == 1

    devices = {}
    for cid in ("c1", "c2", "c3"):
        dev = json.loads(daemon.cli("prepare", "--id", cid, ref, "--json").stdout)
        assert dev["path"].startswith("/dev/loop") and dev["fstype"] == "ext4"
        assert dev["cold"] is False  # the image was pulled and built above
        st = os.stat(dev["path"])
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (dev["major"], dev["minor"])
        backing = Path(f"/sys/block/{Path(dev['path']).name}/loop/backing_file").read_text()
        assert backing.strip().startswith(str(tmp_path))
        assert Path(f"/sys/block/{Path(dev['path']).name}/size").read_text().strip() == str(
            dev["size"] // 512)
        devices[cid] = dev["path"]
    assert len(set(devices.values())) == 3

    for cid, path in devices.items():
        seen = _mount_write_read(path, tmp_path / f"mnt-{cid}", cid, f"data of {cid}")
        assert seen == {cid}, f"{cid} sees other clones' files: {seen}"

    # idempotent: a repeat returns the same device; another image for the id is refused
    again = json.loads(daemon.cli("prepare", "--id", "c1", ref, "--json").stdout)
    assert again["path"] == devices["c1"]
    other = daemon.cli("prepare", "--id", "c1", f"{registry.address}/e2e/busybox:v2",
                 check=False)
    assert other.returncode == 1 and "already prepared" in other.stderr

    listed = json.loads(daemon.cli("ls", "--json").stdout)
    assert sorted(r["container_id"] for r in listed) == ["c1", "c2", "c3"]
    refused = daemon.cli("rmi", ref, check=False)
    assert refused.returncode == 1 and "live clone" in refused.stderr

    for cid in devices:
        assert daemon.cli("release", cid).returncode == 0
        assert daemon.cli("release", cid).returncode == 0  # idempotent
    assert not daemon.volume_loops()  # only the pool itself
    assert json.loads(daemon.cli("ls", "--json").stdout) == []
    daemon.cli("rmi", ref)
    gc = json.loads(daemon.cli("gc", "--json").stdout)
    assert int(gc["bytes_reclaimed"]) > 0
    assert json.loads(daemon.cli("images", "--json").stdout) == []
    assert daemon.stop() == 0  # SIGTERM: graceful shutdown, exit status 0
    assert "kata-ipud stopping" in daemon.log.read_text()
    assert not daemon.socket.exists()


def test_cold_prepare_and_bad_input(daemon: IpuDaemon, registry: RegistryServer) -> None:
    ref = f"{registry.address}/e2e/busybox:v2"
    resp = asyncio.run(_call(daemon, api.ROOTFS_SERVICE, "Prepare",
                             pb.PrepareRequest(container_id="cold1", image=ref),
                             pb.PrepareResponse))
    assert isinstance(resp, pb.PrepareResponse) and resp.cold
    assert resp.rootfs.device.path.startswith("/dev/loop")

    cases = [
        (pb.PrepareRequest(container_id="", image=ref), errors.InvalidArgument, "empty"),
        (pb.PrepareRequest(container_id="a/b", image=ref), errors.InvalidArgument, "invalid"),
        (pb.PrepareRequest(container_id="x1", image="UPPER/Bad::ref"), errors.InvalidArgument,
         None),
        (pb.PrepareRequest(container_id="x2", image=f"{registry.address}/e2e/nope:v1"),
         errors.NotFound, None),
        (pb.PrepareRequest(container_id="x3", image=ref, export=pb.VFIO_PCI),
         errors.FailedPrecondition, "IPU"),
    ]
    for req, cls, fragment in cases:
        with pytest.raises(cls, match=fragment):
            asyncio.run(_call(daemon, api.ROOTFS_SERVICE, "Prepare", req, pb.PrepareResponse))
    # nothing was left behind by the failures, and the daemon still serves
    listed = json.loads(daemon.cli("ls", "--json").stdout)
    assert [r["container_id"] for r in listed] == ["cold1"]
    check = daemon.cli("check")
    assert "ok   loop-control" in check.stdout and "ok   reflink-pool" in check.stdout
    env = json.loads(daemon.cli("env", "--json").stdout)
    assert env["daemon"]["backend"] == "file" and env["daemon"]["volumes"] == 1
    assert env["daemon"]["root"] == str(daemon.root)
    stat = json.loads(daemon.cli("stat", "cold1", "--json").stdout)
    assert 0 < int(stat["allocated_bytes"]) < int(stat["size"])  # sparse, not a full copy


def test_fifty_concurrent_prepares_one_pull_one_build(daemon: IpuDaemon,
                                                      registry: RegistryServer) -> None:
    ref = f"{registry.address}/e2e/busybox:v1"

    async def run() -> list[pb.PrepareResponse]:
        async with await Client.connect(daemon.address) as c:
            return await asyncio.gather(*(
                c.call_message(api.ROOTFS_SERVICE, "Prepare",
                               pb.PrepareRequest(container_id=f"load-{i}", image=ref),
                               pb.PrepareResponse, timeout=300)
                for i in range(50)))

    results = asyncio.run(run())
    assert len({r.rootfs.device.path for r in results}) == 50
    metrics = daemon.metrics_text()
    builds = re.search(r'^kata_ipu_base_builds_total\{result="ok"\} (\S+)$', metrics, re.M)
    assert builds is not None and float(builds.group(1)) == 1.0
    volumes = re.search(r"^kata_ipu_volumes (\S+)$", metrics, re.M)
    assert volumes is not None and float(volumes.group(1)) == 50.0
    # every call waited for the one pull and build, so every call was cold
    cold = re.search(r'^kata_ipu_prepare_seconds_count\{path="cold",result="ok"\} (\S+)$',
                     metrics, re.M)
    assert cold is not None and float(cold.group(1)) == 50.0
    pulled = re.search(r"^kata_ipu_pull_bytes_total (\S+)$", metrics, re.M)
    images = json.loads(daemon.cli("images", "--json").stdout)
    assert pulled is not None and float(pulled.group(1)) == float(images[0]["size_bytes"])


def test_kill_9_then_restart_recovers(daemon: IpuDaemon, registry: RegistryServer,
                                      tmp_path: Path) -> None:
    ref = f"{registry.address}/e2e/busybox:v1"
    kept = json.loads(daemon.cli("prepare", "--id", "keep", ref, "--json").stdout)
    daemon.kill()
    # a half-done build left by the crash must be cleaned up by recovery
    build = daemon.root / "block" / "data" / "build"
    build.mkdir(exist_ok=True)
    (build / "deadbeef-ext4.img").write_bytes(b"\0" * 4096)
    daemon.start()
    log = daemon.log.read_text()
    assert "removed partial build deadbeef-ext4.img" in log
    listed = json.loads(daemon.cli("ls", "--json").stdout)
    assert [r["container_id"] for r in listed] == ["keep"]
    assert listed[0]["path"] == kept["path"] and os.path.exists(kept["path"])
    again = json.loads(daemon.cli("prepare", "--id", "keep", ref, "--json").stdout)
    assert again["path"] == kept["path"]
    assert daemon.cli("release", "keep").returncode == 0
    assert not daemon.volume_loops()  # only the pool itself


def test_garbage_oversize_and_disconnects_leave_the_daemon_serving(
        daemon: IpuDaemon, registry: RegistryServer) -> None:
    sock_path = str(daemon.socket)
    # 1. bytes that are not ttrpc at all, then a hang-up
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall(os.urandom(4096))
    s.close()
    # 2. an oversize frame: answered RESOURCE_EXHAUSTED on its stream, connection kept
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.settimeout(10)
    s.sendall(struct.pack(">IIBB", 5 << 20, 1, 1, 0) + b"\0" * (5 << 20))
    reply = s.recv(4096)
    assert reply[4:10] == struct.pack(">IBB", 1, 2, 0) and b"exceed maximum" in reply
    s.close()
    # 3. a client that disconnects in the middle of a cold Prepare
    ref = f"{registry.address}/e2e/busybox:v2"
    proc = subprocess.Popen([CLI, "--address", daemon.address, "prepare", "--id", "gone", ref],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    # the daemon keeps serving; "gone" is either fully prepared or absent, never half-made
    listed = json.loads(daemon.cli("ls", "--json").stdout)
    assert [r["container_id"] for r in listed] in ([], ["gone"])
    dev = json.loads(daemon.cli("prepare", "--id", "after", ref, "--json").stdout)
    assert Path(dev["path"]).exists()
    for cid in ("gone", "after"):
        daemon.cli("release", cid)
    assert not daemon.volume_loops()


def test_bases_without_clones_are_evicted_above_the_high_water_mark(
        registry: RegistryServer, tmp_path: Path) -> None:
    d = IpuDaemon(tmp_path, pool_size="2G", extra_config="[gc]\nhigh_water = 0.0001\n")
    d.start()
    try:
        v1, v2 = (f"{registry.address}/e2e/busybox:{t}" for t in ("v1", "v2"))
        d.cli("prepare", "--id", "c1", v1)
        d.cli("release", "c1")  # v1's base is now unused
        d.cli("prepare", "--id", "c2", v2)  # building v2 pushes the pool over the mark
        bases = {i["name"]: len(i.get("bases", [])) for i in
                 json.loads(d.cli("images", "--json").stdout)}
        assert bases == {v1: 0, v2: 1}
        assert "base evicted above the high-water mark" in d.log.read_text()
        again = json.loads(d.cli("prepare", "--id", "c3", v1, "--json").stdout)
        assert again["cold"] is True  # rebuilt from the cached blobs; v2 (in use) stays
        bases = {i["name"]: len(i.get("bases", [])) for i in
                 json.loads(d.cli("images", "--json").stdout)}
        assert bases == {v1: 1, v2: 1}
    finally:
        d.teardown()


def test_a_base_of_the_first_layers_and_a_pinned_pull_without_the_registry(
        daemon: IpuDaemon, tmp_path: Path) -> None:
    """What containerd's chain needs from the IPU: Pull tells the layers and diff_ids (the
    chain ids), a digest reference the IPU holds needs no registry, and Prepare can clone a
    base of the image's first N layers (a lower snapshot another image ends at)."""
    motd = LayerBuilder().file("etc/motd", b"top layer\n").build()
    with busybox_registry(tmp_path / "reg", "layers/busybox", {"v1": [motd]}) as reg:
        tagged = f"{reg.address}/layers/busybox:v1"
        pulled = asyncio.run(_call(daemon, api.IMAGE_SERVICE, "Pull",
                                   pb.PullRequest(image=tagged), pb.PullResponse))
        assert isinstance(pulled, pb.PullResponse)
        img = pulled.image
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{tagged}"],
            capture_output=True, check=True, text=True).stdout)
        config = json.loads(subprocess.run(
            ["skopeo", "inspect", "--config", "--raw", "--tls-verify=false",
             f"docker://{tagged}"], capture_output=True, check=True, text=True).stdout)
        assert list(img.layers) == [layer["digest"] for layer in manifest["layers"]]
        assert list(img.diff_ids) == config["rootfs"]["diff_ids"] and len(img.diff_ids) == 2
    pinned = f"{reg.address}/layers/busybox@{img.digest}"  # the registry is gone now
    again = asyncio.run(_call(daemon, api.IMAGE_SERVICE, "Pull", pb.PullRequest(image=pinned),
                              pb.PullResponse))
    assert isinstance(again, pb.PullResponse) and again.image.digest == img.digest

    def prepare(cid: str, layers: int) -> pb.PrepareResponse:
        resp = asyncio.run(_call(daemon, api.ROOTFS_SERVICE, "Prepare", pb.PrepareRequest(
            container_id=cid, image=pinned, options=pb.PrepareOptions(layers=layers)),
            pb.PrepareResponse))
        assert isinstance(resp, pb.PrepareResponse)
        return resp

    lower, whole = prepare("lower", 1), prepare("whole", 2)
    assert lower.cold and not whole.cold  # the first layer's base is built on first use
    seen = {}
    for name, resp in (("lower", lower), ("whole", whole)):
        mnt = tmp_path / f"mnt-{name}"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "ro", resp.rootfs.device.path, str(mnt)], check=True)
        try:
            seen[name] = ((mnt / "etc/motd").exists(), (mnt / "bin/busybox").exists())
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    assert seen == {"lower": (False, True), "whole": (True, True)}
    images = json.loads(daemon.cli("images", "--json").stdout)
    (listed,) = [i for i in images if i["digest"] == img.digest]
    assert sorted(b.get("layers", 0) for b in listed["bases"]) == [0, 1]
    assert prepare("lower", 1).rootfs.device.path == lower.rootfs.device.path  # idempotent
    with pytest.raises(errors.AlreadyExists, match="another base"):
        prepare("lower", 0)
    with pytest.raises(errors.InvalidArgument, match="has 2 layers, not 3"):
        prepare("too-many", 3)
    bases = daemon.root / "block" / "data" / "bases"
    assert len(list(bases.glob(f"{img.digest[7:39]}*.img"))) == 2
    for cid in ("lower", "whole"):
        daemon.cli("release", cid)
    daemon.cli("rmi", pinned)  # both bases go with the image
    assert [i for i in json.loads(daemon.cli("images", "--json").stdout)
            if i["digest"] == img.digest] == []
    assert not list(bases.glob(f"{img.digest[7:39]}*"))
