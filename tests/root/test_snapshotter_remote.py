"""kata-ipu-snapshotter's remote chains on its raw gRPC API, with a real kata-ipud, and what
its restart after kill -9 (and after a reboot took its mounts) finds and repairs.

The calls are the ones containerd's metadata layer makes for a CRI pull (unpack Prepares with
CRI's layer labels, then a List with its filter) and for a container (Prepare on the top
chain, Mounts, Remove). The oracles are the kernel (what the overlay shows once mounted,
``/proc/self/mountinfo``) and kata-ipud's own listings.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from kata_ipu.osutil.mountinfo import mount_source, mounts_under
from kata_ipu.testing.daemon import IpuDaemon, running
from kata_ipu.testing.ocibuild import LayerBuilder
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer
from kata_ipu.testing.snapshotter import SnapshotterProcess
from kata_ipu.testing.wait import until
from shim_hooks.snapshotter.model import chain_id
from shim_hooks.snapshotter.proto import snapshots_pb2 as pb
from tests.support.images import busybox_registry

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"
CLI = str(Path(sys.executable).with_name("kata-ipu"))
MOTD = b"remote chain\n"


@dataclass(frozen=True)
class Image:
    ref: str
    manifest: str
    layers: list[str]
    diff_ids: list[str]


class Api:
    """The snapshots API as containerd's proxy client calls it."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")

    def call(self, method: str, req: object, resp: type) -> object:
        rpc = self.channel.unary_unary(SERVICE + method,
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=resp.FromString)  # type: ignore[attr-defined]
        return rpc(req, timeout=300)

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None
                ) -> pb.PrepareSnapshotResponse:
        out = self.call("Prepare", pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                             labels=labels or {}),
                        pb.PrepareSnapshotResponse)
        assert isinstance(out, pb.PrepareSnapshotResponse)
        return out

    def walk(self, *filters: str) -> list[pb.Info]:
        rpc = self.channel.unary_stream(SERVICE + "List",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=pb.ListSnapshotsResponse.FromString)
        return [i for r in rpc(pb.ListSnapshotsRequest(filters=list(filters)), timeout=60)
                for i in r.info]

    def mounts(self, key: str) -> pb.MountsResponse:
        out = self.call("Mounts", pb.MountsRequest(key=key), pb.MountsResponse)
        assert isinstance(out, pb.MountsResponse)
        return out

    def remove(self, key: str) -> None:
        self.call("Remove", pb.RemoveSnapshotRequest(key=key), empty_pb2.Empty)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    require_root()
    require_programs("docker-registry", "skopeo", "mkfs.ext4", "mkfs.xfs")
    with busybox_registry(tmp_path_factory.mktemp("reg"), "remote/app",
                          {"v1": [LayerBuilder().file("etc/motd", MOTD).build()]}) as reg:
        yield reg


def _image(reg: RegistryServer) -> Image:
    ref = f"{reg.address}/remote/app:v1"

    def inspect(*args: str) -> dict[str, object]:
        out = subprocess.run(["skopeo", "inspect", *args, "--raw", "--tls-verify=false",
                              f"docker://{ref}"], capture_output=True, text=True, check=True)
        data: dict[str, object] = json.loads(out.stdout)
        return data

    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{ref}"], capture_output=True, check=True).stdout
    manifest = inspect()
    config = inspect("--config")
    return Image(ref, "sha256:" + hashlib.sha256(raw).hexdigest(),
                 [str(layer["digest"]) for layer in manifest["layers"]],  # type: ignore[attr-defined]
                 list(config["rootfs"]["diff_ids"]))  # type: ignore[index]


def _pull(api: Api, image: Image, ns: str) -> str:
    """containerd's unpack of ``image`` as its metadata layer drives a remote snapshotter;
    returns the backend name of the top chain."""
    parent = ""
    for k, layer in enumerate(image.layers, 1):
        chain = chain_id(image.diff_ids[:k])
        labels = {"containerd.io/snapshot.ref": chain,
                  "containerd.io/snapshot/cri.image-ref": image.ref,
                  "containerd.io/snapshot/cri.manifest-digest": image.manifest,
                  "containerd.io/snapshot/cri.layer-digest": layer,
                  "containerd.io/snapshot/cri.image-layers": ",".join(image.layers[k - 1:])}
        with pytest.raises(grpc.RpcError) as caught:
            api.prepare(f"{ns}/{k}/extract-{k} {chain}", parent, labels)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
        [found] = api.walk(f'labels."containerd.io/snapshot.ref"=={chain},parent=="{parent}"')
        assert found.kind == pb.COMMITTED
        parent = found.name
    return parent


def _ipu(d: IpuDaemon, *args: str) -> list[dict[str, object]]:
    out = subprocess.run([CLI, "--address", d.address, *args, "--json"], capture_output=True,
                         text=True, check=True, timeout=120)
    data: list[dict[str, object]] = json.loads(out.stdout)
    return data


def _mount_and_read(mounts: pb.MountsResponse, target: Path) -> bytes:
    [m] = mounts.mounts
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", m.type, m.source, str(target), "-o", ",".join(m.options)],
                   check=True)
    try:
        return (target / "etc/motd").read_bytes()
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_container_on_a_remote_chain_survives_kill_9_and_a_lost_mount(
        registry: RegistryServer, tmp_path: Path) -> None:
    image = _image(registry)
    with running(tmp_path / "ipud", pool_size="2G",
                 insecure_registries=(registry.address,)) as ipud:
        sn = SnapshotterProcess(tmp_path / "sn", ipu_address=ipud.address)
        sn.start()
        api = Api(sn.socket)
        try:
            top = _pull(api, image, "k8s.io")
            assert [i["digest"] for i in _ipu(ipud, "images")] != []  # pulled by the IPU
            mounts = api.prepare("k8s.io/9/c1", top).mounts
            [overlay] = mounts
            lowerdir = next(o for o in overlay.options if o.startswith("lowerdir="))[9:]
            assert ":" not in lowerdir and mount_source(lowerdir) is not None
            assert _mount_and_read(api.mounts("k8s.io/9/c1"), tmp_path / "c1") == MOTD
            hints = list((sn.root / "hints").glob("*.json"))
            assert len(hints) == 1 and json.loads(hints[0].read_text())["key"] == "c1"

            sn.kill()  # kill -9: the lower stays mounted, the metadata stays as it was
            (sn.root / "snapshots" / "new-leftover").mkdir()  # a crash mid-Prepare
            (sn.root / "hints" / "0123.json").write_text("{}")  # a stray hint
            subprocess.run(["umount", lowerdir], check=True)  # and a reboot took the mount
            sn.start()
            log = sn.log_text()
            assert "recovery: removed" in log and "new-leftover" in log
            assert mount_source(lowerdir) is not None  # mounted again for c1
            assert not (sn.root / "snapshots" / "new-leftover").exists()
            assert [h.name for h in (sn.root / "hints").glob("*.json")] == [hints[0].name]
            assert _mount_and_read(api.mounts("k8s.io/9/c1"), tmp_path / "c1") == MOTD

            api.remove("k8s.io/9/c1")
            assert until(lambda: mount_source(lowerdir) is None and not [
                v for v in _ipu(ipud, "ls") if str(v["container_id"]).startswith("snap-")])
            for info in sorted(api.walk(), key=lambda i: -len(i.parent)):
                api.remove(info.name)  # the top chain first: children before parents
            assert until(lambda: _ipu(ipud, "images") == [])  # the host's last one went
        finally:
            api.close()
            sn.teardown()
    assert not mounts_under(tmp_path)


def test_an_unused_lower_lingers_for_the_next_container_then_goes(
        registry: RegistryServer, tmp_path: Path) -> None:
    """``lower_linger``: the image's next container finds its lower still mounted (no new
    IPU clone, the same device), and the lower goes once nothing used it for that long."""
    image = _image(registry)
    with running(tmp_path / "ipud", pool_size="2G",
                 insecure_registries=(registry.address,)) as ipud:
        sn = SnapshotterProcess(tmp_path / "sn", ipu_address=ipud.address, lower_linger=2.0)
        sn.start()
        api = Api(sn.socket)
        try:
            top = _pull(api, image, "k8s.io")

            def lowers() -> list[dict[str, object]]:
                return [v for v in _ipu(ipud, "ls") if str(v["container_id"]).startswith("snap-")]

            api.prepare("k8s.io/1/c1", top)
            [first] = lowers()
            api.remove("k8s.io/1/c1")
            time.sleep(0.5)
            assert lowers() == [first] and len(sn.mounts()) == 1  # lingering
            api.prepare("k8s.io/2/c2", top)  # the next container takes it as it is
            assert lowers() == [first]
            api.remove("k8s.io/2/c2")
            assert until(lambda: not lowers() and not sn.mounts(), timeout=15)
        finally:
            api.close()
            sn.teardown()
    assert not mounts_under(tmp_path)
