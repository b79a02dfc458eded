"""Kubernetes for real: containerd 1.6's CRI plugin with the ``ipu`` snapshotter, driven as
kubelet drives it (kata_ipu.testing.cri speaks containerd's own ``runtime.v1``).

Everything is real: containerd with its CRI plugin, its runc shim and runc, the distribution
registry, kata-ipud with a real pool, kata-ipu-snapshotter as containerd's
``[proxy_plugins.ipu]``, and the shim proxy as the shipped ``kata-ipu-runc`` handler
(configs/containerd/kata-ipu-1.6.toml, verbatim; the ``kata-ipu`` handler is the same proxy
with the Kata delegate, which cannot run on this machine). Oracles: containerd's content
store and snapshot listings (what the host downloaded and unpacked), ``/proc/PID/io`` and the
disk under containerd's root (what a PullImage cost it), the container's own view of ``/``
(ExecSync of ``/proc/self/mounts`` and files), sysfs (whose loop device it is) and kata-ipud's
listings (what the IPU holds).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kata_ipu.osutil.mountinfo import mounts_under
from kata_ipu.testing.cri import ContainerSpec, CriClient, CriError, PodSpec
from kata_ipu.testing.crinode import (
    CRI_NAMESPACE,
    CriNode,
    host_cost,
    publish_pause_image,
    snippet_handler,
)
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer, push
from kata_ipu.testing.shimd import ShimServer
from kata_ipu.testing.snapshotter import SnapshotterProcess
from kata_ipu.testing.wait import until
from shim_hooks.shim import PROXY_NAME

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLI = str(Path(sys.executable).with_name("kata-ipu"))
MOTD_V1 = b"kata-ipu cri v1\n"
MOTD_V2 = b"kata-ipu cri v2, re-pushed\n"
BIG = 24 << 20


@dataclass
class Env:
    work: Path
    reg: RegistryServer
    ipud: IpuDaemon
    sn: SnapshotterProcess
    shimd: ShimServer
    node: CriNode
    layout: OciLayout
    base: bytes

    def ref(self, tag: str) -> str:
        return f"{self.reg.address}/cri/app:{tag}"

    @property
    def cri(self) -> CriClient:
        return self.node.cri

    def ctr(self, *args: str) -> str:
        return self.node.ctd.ctr(*args, namespace=CRI_NAMESPACE).stdout

    def ipu(self, *args: str) -> object:
        out = subprocess.run([CLI, "--address", self.ipud.address, *args, "--json"],
                             capture_output=True, text=True, check=True, timeout=120)
        return json.loads(out.stdout)

    def ipu_images(self) -> list[dict[str, object]]:
        images = self.ipu("images")
        assert isinstance(images, list)
        return images

    def volumes(self) -> list[dict[str, object]]:
        vols = self.ipu("ls")
        assert isinstance(vols, list)
        return vols

    def blobs(self) -> dict[str, int]:
        """containerd's content store, as files: digest -> size."""
        top = self.node.ctd.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
        return {f"sha256:{p.name}": p.stat().st_size for p in top.iterdir()}

    def manifest(self, ref: str) -> dict[str, Any]:
        info = self.cri.image_status(ref)
        assert info is not None
        digest = info.repo_digests[0].rpartition("@")[2]
        top = self.node.ctd.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
        data: dict[str, Any] = json.loads((top / digest.removeprefix("sha256:")).read_text())
        return data

    def push(self, tag: str, *layers: bytes) -> None:
        self.layout.add_image([self.base, *layers], ref=tag)
        push(self.work / "oci", tag, self.ref(tag))


def _handler(name: str) -> str:
    """The shipped containerd 1.6 snippet's handler ``name``, as it is."""
    return snippet_handler(CONFIGS / "containerd" / "kata-ipu-1.6.toml", name)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_root()
    require_programs("containerd", "containerd-shim-runc-v2", "runc", "docker-registry",
                     "skopeo", "mkfs.ext4", "mkfs.xfs", "busybox")
    work = tmp_path_factory.mktemp("cri-ipu")
    for d in ("reg", "ipud"):
        (work / d).mkdir()
    with RegistryServer(work / "reg") as reg:
        pause = publish_pause_image(reg, work)
        layout = OciLayout(work / "oci")
        base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
        ipud = IpuDaemon(work / "ipud", pool_size="3G", insecure_registries=(reg.address,))
        sn = SnapshotterProcess(work / "sn", ipu_address=ipud.address)
        shim_config = work / "shim.toml"
        shim_config.write_text(f'socket_dir = "{work}/s"\nsnapshotter_root = "{sn.root}"\n'
                               f'[runtime]\nstate_dir = "{work}/runtime-state"\n')
        shims = {"KATA_IPU_ADDRESS": ipud.address, "KATA_IPU_SHIM_CONFIG": str(shim_config)}
        shimd = ShimServer(work, shims)  # the fast start path, as on a node (ADR 0004)
        node = CriNode(work / "node", registry=reg.address, sandbox_image=pause,
                       snapshotter="ipu", proxy_plugins={"ipu": sn.socket},
                       runtimes_toml=_handler("kata-ipu-runc") + _handler("kata-ipu-runtime"),
                       env={**shims, "KATA_IPU_SHIM_SERVER": str(shimd.socket)})
        e = Env(work, reg, ipud, sn, shimd, node, layout, base)
        e.push("v1", LayerBuilder().file("etc/motd", MOTD_V1).build())
        try:
            ipud.start()
            sn.start()
            shimd.start()
            node.start()
            yield e
        finally:
            node.teardown()
            shimd.stop()
            sn.teardown()
            ipud.teardown()
            assert not mounts_under(work), "mounts left behind"
    assert not [b for b in Path("/sys/block").glob("loop*/loop/backing_file")
                if b.read_text().strip().startswith(str(work))], "loop devices leaked"


def _collect(env: Env) -> None:
    """Run containerd's garbage collection now and wait for it (snapshot removals reach
    the backend only through it; the snapshotter then releases lowers and images in the
    background, hence the ``until`` after it). Its scheduler drops a
    deletion it sees after a collection that started before it (gc/scheduler: an event older
    than the last collection's end is ignored), so a removed snapshot can wait for the next
    unrelated deletion; deleting a lease synchronously collects at once."""
    lease = env.ctr("leases", "create").split()[0]
    env.ctr("leases", "delete", "--sync", lease)


@pytest.fixture(autouse=True)
def nothing_leaks(env: Env) -> Iterator[None]:
    yield
    assert env.node.remove_all() == []
    assert env.cri.list_pod_sandboxes() == []
    assert until(lambda: not _shims(env)), f"shims left: {_shims(env)}"
    _collect(env)
    assert until(lambda: not env.sn.mounts()), (
        f"lowers still mounted: {env.sn.mounts()}\n{env.sn.log_text()[-6000:]}")
    assert env.volumes() == [], "IPU volumes leaked"
    assert not mounts_under(env.node.ctd.state), "bundle mounts leaked"


def _shims(env: Env) -> list[str]:
    """Shim processes of this node: containerd passes its own socket to every shim it starts
    (``-address``), and kata-ipu-shimd's spares that became proxies are its children."""
    address = str(env.node.ctd.socket).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if address in argv and b"-address" in argv:
                found.append(f"{proc.name}: {b' '.join(argv[:2]).decode(errors='replace')}")
    for pid in env.shimd.children():  # spares that became proxies (ADR 0004)
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == PROXY_NAME:
                found.append(f"{pid}: {PROXY_NAME}")
    return found


def _pod(env: Env, name: str) -> PodSpec:
    return PodSpec(name=name, namespace="kata-ipu-test",
                   log_directory=str(env.work / "logs" / name))


def _run(env: Env, pod: PodSpec, image: str, handler: str = "", containers: int = 1
         ) -> tuple[str, list[str]]:
    cri = env.cri
    pod_id = cri.run_pod_sandbox(pod, runtime_handler=handler)
    cids = []
    for i in range(containers):
        cid = cri.create_container(pod_id, pod, ContainerSpec(
            f"app{i}", image, command=["sleep", "3600"], log_path=f"app{i}.log"))
        cri.start_container(cid)
        cids.append(cid)
    return pod_id, cids


def _root(env: Env, cid: str) -> tuple[str, str]:
    """(source, fstype) of ``/`` as the container sees it."""
    mounts = env.cri.exec_sync(cid, ["cat", "/proc/self/mounts"]).stdout.decode()
    line = next(m for m in mounts.splitlines() if m.split()[1] == "/")
    return line.split()[0], line.split()[2]


def _backing(device: str) -> str:
    return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()


def _stop(env: Env, *pod_ids: str) -> None:
    for pod_id in pod_ids:
        env.cri.stop_pod_sandbox(pod_id)
        env.cri.remove_pod_sandbox(pod_id)


def test_pull_fetches_only_manifest_and_config_on_the_host(env: Env) -> None:
    ref = env.ref("v1")
    before = env.node.cost()
    image_id = env.cri.pull_image(ref)
    cost = env.node.cost() - before
    # containerd's content store: the manifest and the config, not one layer
    blobs = env.blobs()
    manifest = env.manifest(ref)
    assert manifest["config"]["digest"] == image_id and image_id in blobs
    layers = {layer["digest"] for layer in manifest["layers"]}
    assert len(layers) == 2 and not layers & set(blobs), blobs
    snapshots = env.ctr("snapshots", "--snapshotter", "ipu", "ls").split("\n")[1:]
    assert len([s for s in snapshots if s.strip()]) == 2  # busybox, motd: both committed
    assert all("Committed" in s for s in snapshots if s.strip())
    [img] = [i for i in env.ipu_images() if str(i["name"]).startswith(ref.rpartition(":")[0])]
    assert str(img["name"]).endswith("@" + env.cri.image_status(ref).repo_digests[0]  # type: ignore[union-attr]
                                     .rpartition("@")[2])
    assert cost.disk_bytes < 256 << 10, cost  # a few KiB of JSON and containerd's metadata


def test_a_runc_pod_sees_the_images_files_from_the_ipus_lower(env: Env) -> None:
    ref = env.ref("v1")
    env.cri.pull_image(ref)
    pod = _pod(env, "runc")
    pod_id, [cid] = _run(env, pod, ref)
    assert env.cri.exec_sync(cid, ["cat", "/etc/motd"]).stdout == MOTD_V1
    assert env.cri.exec_sync(cid, ["ls", "/bin/busybox"]).exit_code == 0
    assert _root(env, cid) == ("overlay", "overlay")
    # one lower for the image (and one for the pause image), read-only, from the IPU
    lowers = {m: env.sn.lower_info(m) for m in env.sn.mounts()}
    assert len(lowers) == 2, lowers
    mine = [m for m, info in lowers.items()
            if str(info["reference"]).startswith(f"{env.reg.address}/cri/app@sha256:")]
    assert len(mine) == 1
    source = next(line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1] == mine[0])
    assert _backing(source).startswith(str(env.ipud.root))
    assert " ro," in next(line for line in Path("/proc/mounts").read_text().splitlines()
                          if line.split()[1] == mine[0]) + ","
    # the container writes to its own upper dir on the host, not into the lower
    assert env.cri.exec_sync(cid, ["sh", "-c", "echo x > /etc/motd"]).exit_code == 0
    assert (Path(mine[0]) / "etc/motd").read_bytes() == MOTD_V1
    lower_volumes = [v for v in env.volumes() if str(v["container_id"]).startswith("snap-")]
    assert len(lower_volumes) == 2
    _stop(env, pod_id)


def test_kata_ipu_pods_get_a_clone_each_of_exactly_the_pulled_image(env: Env) -> None:
    """The shipped kata-ipu-runc handler, 2 pods x 2 containers: 4 distinct IPU clones of the
    image containerd resolved (by digest), the pause containers on the pause image's lower."""
    ref = env.ref("v1")
    env.cri.pull_image(ref)
    pods, devices = [], {}
    for p in range(2):
        pod_id, cids = _run(env, _pod(env, f"kata-ipu-{p}"), ref, "kata-ipu-runc", 2)
        pods.append(pod_id)
        for cid in cids:
            source, fstype = _root(env, cid)
            assert (source.startswith("/dev/loop"), fstype) == (True, "ext4"), (source, fstype)
            assert _backing(source).startswith(str(env.ipud.root / "block" / "data"))
            assert env.cri.exec_sync(cid, ["cat", "/etc/motd"]).stdout == MOTD_V1
            devices[cid] = source
    assert len(set(devices.values())) == 4
    # every app container joined its pod's proxy (no delegate start ran for it), and its
    # rootfs was prepared on Expect
    log = env.node.log_text()
    joined = log.count("joined the proxy of the container's group")
    expected = log.count("preparing the rootfs of an expected container")
    assert joined >= 4 and expected >= 4, (joined, expected)
    clones = [v for v in env.volumes() if not str(v["container_id"]).startswith("snap-")]
    assert len(clones) == 4
    assert {str(v["image"]) for v in clones} == {str(clones[0]["image"])}
    assert "@sha256:" in str(clones[0]["image"])  # by digest, never by the tag
    _stop(env, *pods)


def test_a_tag_re_pushed_after_the_pull_does_not_change_the_container(env: Env) -> None:
    """PullImage resolved the tag; the container started after a re-push still gets that
    image's files (with that image's config), both on runc and on the IPU's clone."""
    ref = env.ref("retag")
    env.push("retag", LayerBuilder().file("etc/motd", MOTD_V1).file("etc/retag", b"1").build())
    env.cri.pull_image(ref)
    pod_runc, pod_ipu = _pod(env, "retag-runc"), _pod(env, "retag-ipu")
    ids = {}
    for pod, handler in ((pod_runc, ""), (pod_ipu, "kata-ipu-runc")):
        pod_id = env.cri.run_pod_sandbox(pod, runtime_handler=handler)
        cid = env.cri.create_container(pod_id, pod, ContainerSpec(
            "app", ref, command=["sleep", "3600"], log_path="app.log"))
        ids[handler] = (pod_id, cid)
    env.push("retag", LayerBuilder().file("etc/motd", MOTD_V2).build())  # the tag moves on
    for handler, (_pod_id, cid) in ids.items():
        env.cri.start_container(cid)
        assert env.cri.exec_sync(cid, ["cat", "/etc/motd"]).stdout == MOTD_V1, handler
        assert env.cri.exec_sync(cid, ["cat", "/etc/retag"]).stdout == b"1", handler
    assert _root(env, ids["kata-ipu-runc"][1])[1] == "ext4"
    _stop(env, *(pod_id for pod_id, _cid in ids.values()))


def test_an_image_that_is_a_prefix_of_another_gets_exactly_its_own_layers(env: Env) -> None:
    """Pulling the longer image first commits the shorter one's chain as a lower snapshot
    of it: containers of the shorter image must not see the longer one's top layer."""
    a = LayerBuilder().file("opt/a", b"a\n").build()
    env.push("long", a, LayerBuilder().file("opt/b", b"b\n").build())
    env.push("short", a)
    env.cri.pull_image(env.ref("long"))
    env.cri.pull_image(env.ref("short"))  # every chain exists already: nothing asked
    for handler in ("", "kata-ipu-runc"):
        pod_id, [cid] = _run(env, _pod(env, f"prefix{handler}"), env.ref("short"), handler)
        assert env.cri.exec_sync(cid, ["cat", "/opt/a"]).stdout == b"a\n", handler
        assert env.cri.exec_sync(cid, ["ls", "/opt"]).stdout == b"a\n", handler
        assert _root(env, cid)[1] == ("ext4" if handler else "overlay")
        _stop(env, pod_id)
    [long] = [i for i in env.ipu_images() if i["digest"] == _ipu_digest(env, "long")]
    assert {b.get("layers", 0) for b in long["bases"]} == {0, 2}  # the whole, its first 2


def _ipu_digest(env: Env, tag: str) -> str:
    return str(env.manifest(env.ref(tag)) and env.cri.image_status(env.ref(tag))
               .repo_digests[0].rpartition("@")[2])  # type: ignore[union-attr]


def test_an_image_the_ipu_refuses_fails_the_pull_with_its_reason(env: Env) -> None:
    env.push("hostile", LayerBuilder().file("../../escape", b"x").build())
    before = env.ctr("snapshots", "--snapshotter", "ipu", "ls")
    with pytest.raises(CriError) as caught:
        env.cri.pull_image(env.ref("hostile"))
    assert "refusing path" in str(caught.value) and "escape" in str(caught.value), caught.value
    assert env.cri.image_status(env.ref("hostile")) is None
    assert env.ctr("snapshots", "--snapshotter", "ipu", "ls") == before  # nothing committed
    assert not (env.work / "escape").exists()
    assert "the IPU refused" in env.sn.log_text()


def test_removing_the_image_releases_it_on_the_ipu(env: Env) -> None:
    env.push("gone", LayerBuilder().file("etc/gone", b"soon\n").build())
    env.cri.pull_image(env.ref("gone"))
    digest = _ipu_digest(env, "gone")
    assert any(i["name"] == f"{env.reg.address}/cri/app@{digest}" for i in env.ipu_images())
    env.cri.remove_image(env.ref("gone"))
    _collect(env)
    assert until(lambda: not any(str(i["name"]).endswith(digest)
                                       for i in env.ipu_images()))
    assert "removed from the IPU" in env.sn.log_text()


def test_the_ipu_down_at_pull_falls_back_to_the_host(env: Env) -> None:
    """With kata-ipud stopped, PullImage of an image that shares no layer with the IPU's
    still works: containerd fetches and unpacks its layers itself (the snapshotter says why
    in its log); the container sees the files, and a kata-ipu container keeps that host
    rootfs. A pod already running keeps the pause image's lower mounted, so new pods need no
    IPU either. An image whose lower layers the IPU holds cannot be unpacked without them:
    its PullImage fails, saying so, and works once the IPU is back."""
    keeper, [keeper_app] = _run(env, _pod(env, "keeper"), env.ref("v1"))
    own_base = LayerBuilder().tree(busybox_tree(env.work / "tree-solo")).file(
        "etc/solo", b"a base of its own\n").build()
    env.layout.add_image([own_base, LayerBuilder().file("etc/motd", b"solo\n").build()],
                         ref="solo")
    push(env.work / "oci", "solo", env.ref("solo"))
    env.push("shared", LayerBuilder().file("etc/motd", b"on busybox's chain\n").build())
    env.ipud.stop()
    try:
        env.cri.pull_image(env.ref("solo"))
        layers = {layer["digest"] for layer in env.manifest(env.ref("solo"))["layers"]}
        assert layers <= set(env.blobs())  # fetched by containerd, unpacked on the host
        ids = []
        for handler in ("", "kata-ipu-runc"):
            pod_id, [cid] = _run(env, _pod(env, f"solo{handler}"), env.ref("solo"), handler)
            ids.append(pod_id)
            assert env.cri.exec_sync(cid, ["cat", "/etc/motd"]).stdout == b"solo\n", handler
            assert _root(env, cid) == ("overlay", "overlay"), handler
        assert env.cri.exec_sync(keeper_app, ["cat", "/etc/motd"]).stdout == MOTD_V1
        log = env.sn.log_text()
        assert "prepared on the host" in log and "UNAVAILABLE" in log
        with pytest.raises(CriError) as caught:
            env.cri.pull_image(env.ref("shared"))
        assert "whose files are on the IPU" in str(caught.value), caught.value
        _stop(env, *ids)
    finally:
        env.ipud.start()
    env.cri.pull_image(env.ref("shared"))
    pod_id, [cid] = _run(env, _pod(env, "shared"), env.ref("shared"))
    assert env.cri.exec_sync(cid, ["cat", "/etc/motd"]).stdout == b"on busybox's chain\n"
    _stop(env, pod_id, keeper)


def test_the_runc_wrapper_handler_gets_its_clone_by_the_chain_too(env: Env) -> None:
    handler = _handler("kata-ipu-runtime")
    assert "BinaryName" in handler
    pod_id, [cid] = _run(env, _pod(env, "wrapper"), env.ref("v1"), "kata-ipu-runtime")
    source, fstype = _root(env, cid)
    assert source.startswith("/dev/loop") and fstype == "ext4"
    assert env.cri.exec_sync(cid, ["cat", "/etc/motd"]).stdout == MOTD_V1
    [clone] = [v for v in env.volumes() if not str(v["container_id"]).startswith("snap-")]
    assert "@sha256:" in str(clone["image"])
    _stop(env, pod_id)


def test_host_cost_of_a_pull_with_and_without_the_ipu_snapshotter(env: Env) -> None:
    """The same never-seen image pulled by a plain overlayfs node and by this one: what the
    host writes and keeps (containerd's root and, here, the snapshotter's too)."""
    big = LayerBuilder().file("big", os.urandom(BIG)).build()
    env.push("big", big)
    plain = CriNode(env.work / "plain", registry=env.reg.address,
                    sandbox_image=env.node.sandbox_image)
    try:
        plain.start()
        before = plain.cost()
        plain.cri.pull_image(env.ref("big"))
        without = plain.cost() - before
    finally:
        plain.teardown()
    sn_before = host_cost(env.sn.pid, env.sn.root)
    before = env.node.cost()
    env.cri.pull_image(env.ref("big"))
    ctd = env.node.cost() - before
    sn = host_cost(env.sn.pid, env.sn.root) - sn_before
    print(f"PullImage host cost: plain {without}; ipu containerd {ctd}, snapshotter {sn}")
    assert without.disk_bytes > BIG and without.write_bytes > BIG, without
    assert ctd.disk_bytes + sn.disk_bytes < without.disk_bytes / 100, (ctd, sn)
    # what containerd writes besides the layers (its bolt database's pages, about 1 MB a pull
    # here, in both modes) is independent of the image's size: no copy of any layer is written
    assert ctd.write_bytes + sn.write_bytes < without.write_bytes / 20, (ctd, sn)


def test_a_docker_schema2_image_is_served_by_the_digest_containerd_resolved(env: Env) -> None:
    """The IPU stores a Docker schema2 manifest in its OCI form (another digest); everything
    still goes by the registry's digest, which is what containerd resolved and labelled."""
    env.layout.add_image([env.base, LayerBuilder().file("etc/motd", b"schema2\n").build()],
                         ref="docker")
    push(env.work / "oci", "docker", env.ref("docker"), preserve_digests=False,
         extra=("--format", "v2s2"))
    env.cri.pull_image(env.ref("docker"))
    manifest = env.manifest(env.ref("docker"))
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert not {layer["digest"] for layer in manifest["layers"]} & set(env.blobs())
    registry_digest = _ipu_digest(env, "docker")
    [img] = [i for i in env.ipu_images() if str(i["name"]).endswith(registry_digest)]
    assert img["digest"] != registry_digest  # the IPU's OCI form
    for handler in ("", "kata-ipu-runc"):
        pod_id, [cid] = _run(env, _pod(env, f"schema2{handler}"), env.ref("docker"), handler)
        assert env.cri.exec_sync(cid, ["cat", "/etc/motd"]).stdout == b"schema2\n", handler
        assert _root(env, cid)[1] == ("ext4" if handler else "overlay"), handler
        _stop(env, pod_id)
