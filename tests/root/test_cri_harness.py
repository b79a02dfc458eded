"""The CRI harness itself (kata_ipu.testing.cri, kata_ipu.testing.crinode), proven against the
plain runc handler and the overlayfs snapshotter before other tests trust it.

Everything is real: Debian's containerd 1.6 with its CRI plugin on private dirs, runc, the
distribution registry serving a busybox image with an ``/etc/motd`` layer and a pause image
built from busybox-static. The client speaks ``runtime.v1`` as kubelet does. The oracles are
the container itself (ExecSync output), CRI's own listings and ``/proc/self/mountinfo``
(nothing may stay mounted under the node's dirs once the pods are gone).
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kata_ipu.osutil.mountinfo import mounts_under
from kata_ipu.testing.cri import ContainerSpec, ContainerState, CriError, ExecResult, PodSpec
from kata_ipu.testing.crinode import CriNode, cri_cgroups, cri_config, publish_pause_image
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer, push

MOTD = b"kata-ipu cri harness\n"
BIG_FILE = 16 << 20  # random, so gzip cannot shrink it: the pull must move it all


@dataclass(frozen=True)
class Env:
    work: Path
    node: CriNode
    pause_ref: str
    motd_ref: str
    big_ref: str
    big_uncompressed: int
    """Bytes of the big image's uncompressed layer tars."""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_root()
    require_programs("containerd", "containerd-shim-runc-v2", "runc", "docker-registry",
                     "skopeo", "busybox")
    work = tmp_path_factory.mktemp("cri")
    host_cni = Path("/etc/cni/net.d").exists()
    host_cgroups = cri_cgroups()
    (work / "reg").mkdir()
    with RegistryServer(work / "reg") as reg:
        pause_ref = publish_pause_image(reg, work)
        layout = OciLayout(work / "oci")
        base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
        layout.add_image([base, LayerBuilder().file("etc/motd", MOTD).build()], ref="motd")
        big = [base, LayerBuilder().file("big", os.urandom(BIG_FILE)).build()]
        layout.add_image(big, ref="big")
        for tag in ("motd", "big"):
            push(work / "oci", tag, f"{reg.address}/cri/busybox:{tag}")
        node = CriNode(work / "node", registry=reg.address, sandbox_image=pause_ref)
        try:
            node.start()
            yield Env(work, node, pause_ref, f"{reg.address}/cri/busybox:motd",
                      f"{reg.address}/cri/busybox:big", sum(len(layer) for layer in big))
        finally:
            node.teardown()
            node.teardown()  # idempotent
            assert not mounts_under(node.workdir), "mounts left under the node's dirs"
    assert Path("/etc/cni/net.d").exists() == host_cni, "the CRI plugin created /etc/cni/net.d"
    assert cri_cgroups() <= host_cgroups, "k8s.io cgroups left behind"


@pytest.fixture(autouse=True)
def clean_node(env: Env) -> Iterator[None]:
    """Whatever a test leaves behind is removed through CRI, and nothing may stay mounted."""
    yield
    errors = env.node.remove_all()
    assert not errors, errors
    assert env.node.cri.list_pod_sandboxes() == []
    assert not mounts_under(env.node.workdir), "mounts left under the node's dirs"


def _pod(env: Env, name: str) -> PodSpec:
    return PodSpec(name=name, namespace="kata-ipu-test",
                   log_directory=str(env.work / "logs" / name))


def test_pod_lifecycle_runc_overlayfs(env: Env) -> None:
    cri = env.node.cri
    assert cri.version().runtime_api_version == "v1"
    pod = _pod(env, "lifecycle")
    pod_id = cri.run_pod_sandbox(pod)

    image_ref = cri.pull_image(env.motd_ref, pod)
    info = cri.image_status(env.motd_ref)
    assert info is not None and info.id == image_ref and env.motd_ref in info.repo_tags
    assert info.size > 0
    assert image_ref in {i.id for i in cri.list_images()}

    cid = cri.create_container(pod_id, pod, ContainerSpec(
        "sleeper", env.motd_ref, command=["sleep", "3600"], envs={"KATA": "ipu"},
        labels={"app": "harness"}, log_path="sleeper.log"))
    assert cri.container_status(cid).state is ContainerState.CREATED
    cri.start_container(cid)

    assert cri.exec_sync(cid, ["cat", "/etc/motd"]) == ExecResult(0, MOTD, b"")
    listing = cri.exec_sync(cid, ["ls", "/"])
    assert {"bin", "dev", "etc", "proc", "sys", "tmp"} <= set(listing.stdout.decode().split())
    assert cri.exec_sync(cid, ["sh", "-c", "echo $KATA; echo err >&2; exit 3"]) == \
        ExecResult(3, b"ipu\n", b"err\n")

    status = cri.container_status(cid)
    assert status.state is ContainerState.RUNNING, status
    assert (status.image, status.labels["app"]) == (env.motd_ref, "harness")
    assert status.image_ref.startswith(env.motd_ref.rpartition(":")[0] + "@sha256:")
    assert [c.id for c in cri.list_containers(pod_id)] == [cid]
    [sandbox] = cri.list_pod_sandboxes()
    assert (sandbox.id, sandbox.name, sandbox.state.name) == (pod_id, "lifecycle", "READY")
    # the container's / is an overlay mount under the node's state dir
    assert any(m.endswith(f"/{cid}/rootfs") for m in mounts_under(env.node.ctd.state))

    with pytest.raises(CriError) as caught:
        cri.container_status("no-such-container")
    assert caught.value.code_name == "NOT_FOUND"
    assert "ContainerStatus" in str(caught.value) and "NOT_FOUND" in str(caught.value)

    cri.stop_pod_sandbox(pod_id)
    assert cri.container_status(cid).state is ContainerState.EXITED
    cri.remove_pod_sandbox(pod_id)
    assert cri.list_containers() == []
    assert cri.list_pod_sandboxes() == []
    assert not mounts_under(env.node.workdir)

    cri.remove_image(env.motd_ref)
    assert cri.image_status(env.motd_ref) is None


def test_pause_image_exits_zero_on_sigterm(env: Env) -> None:
    """The pause image run as an ordinary container: StopContainer's SIGTERM ends it at once
    with exit code 0, well before the 20 s grace period would bring SIGKILL."""
    cri = env.node.cri
    pod = _pod(env, "pause")
    pod_id = cri.run_pod_sandbox(pod)
    cri.pull_image(env.pause_ref, pod)
    cid = cri.create_container(pod_id, pod, ContainerSpec("pause", env.pause_ref))
    cri.start_container(cid)
    assert cri.container_status(cid).state is ContainerState.RUNNING
    started = time.monotonic()
    cri.stop_container(cid, timeout=20)
    assert time.monotonic() - started < 10
    status = cri.container_status(cid)
    assert (status.state, status.exit_code) == (ContainerState.EXITED, 0), status
    cri.stop_pod_sandbox(pod_id)
    cri.remove_pod_sandbox(pod_id)


def test_host_cost_of_a_pull(env: Env) -> None:
    """Under overlayfs containerd itself stores the compressed blobs and unpacks them, so one
    PullImage makes it write (and allocate) more than the image's uncompressed size."""
    node = env.node
    before = node.cost()
    node.cri.pull_image(env.big_ref)
    cost = node.cost() - before
    assert cost.cpu_seconds > 0, cost
    assert cost.write_bytes > env.big_uncompressed, cost
    assert cost.disk_bytes > env.big_uncompressed, cost
    node.cri.remove_image(env.big_ref)


def test_config_tables(env: Env, tmp_path: Path) -> None:
    """The CRI tables the node wrote are what containerd 1.6 reads (TOML, config version 2)."""
    config = tomllib.loads(env.node.ctd.config.read_text())
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert (cri["restrict_oom_score_adj"], cri["stream_server_port"]) == (True, "0")
    assert cri["sandbox_image"] == env.pause_ref
    assert cri["containerd"]["snapshotter"] == "overlayfs"
    assert cri["containerd"]["runtimes"]["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert Path(cri["cni"]["conf_dir"]).is_relative_to(env.node.workdir)
    hosts = Path(cri["registry"]["config_path"]) / env.motd_ref.split("/")[0] / "hosts.toml"
    assert tomllib.loads(hosts.read_text())["server"].startswith("http://127.0.0.1:")

    extra = cri_config(tmp_path, sandbox_image="r/p:1", certs_d=tmp_path / "certs.d",
                       snapshotter="ipu", disable_snapshot_annotations=True,
                       proxy_plugins={"ipu": tmp_path / "snap.sock"},
                       runtimes_toml='[plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
                                     '.kata-ipu]\nruntime_type = "io.containerd.kata-ipu.v2"\n')
    parsed = tomllib.loads(extra)
    assert parsed["proxy_plugins"]["ipu"] == {"type": "snapshot",
                                              "address": str(tmp_path / "snap.sock")}
    ctd = parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert (ctd["snapshotter"], ctd["disable_snapshot_annotations"]) == ("ipu", True)
    assert set(ctd["runtimes"]) == {"runc", "kata-ipu"}


def test_start_fails_fast_and_cleanly_without_its_snapshotter(env: Env) -> None:
    """A CRI plugin that cannot load (its snapshotter does not exist) is reported with
    containerd's log at once, not after the start timeout, and leaves nothing running."""
    node = CriNode(env.work / "broken", registry="127.0.0.1:1", sandbox_image=env.pause_ref,
                   snapshotter="no-such-snapshotter")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no-such-snapshotter"):
        node.start(timeout=30)
    assert time.monotonic() - started < 15
    assert not node.running()
    node.teardown()
    assert not mounts_under(node.workdir)
