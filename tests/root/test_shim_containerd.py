"""containerd-shim-kata-ipu-v2 and kata-ipu-runtime under a real containerd (Debian's 1.6).

Everything is real: containerd on a private socket/root/state dir, its runc shim and runc, the
distribution registry, kata-ipud with a real pool. ``ctr`` drives it the way users do. The
oracle is the kernel: ``/proc/<container pid>/mounts`` says what the container's ``/`` is,
``/sys/block/loopN/loop/backing_file`` says whose block device it is, ``/proc/mounts`` and the
daemon's volume list say whether anything was left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kata_ipu.testing.containerd import Containerd, mounts_under
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer, push
from shim_hooks import shim

RUNTIME = "io.containerd.kata-ipu.v2"
IMAGE_ANN = "io.katacontainers.ipu.image"
CLI = str(Path(sys.executable).with_name("kata-ipu"))
WRAPPER = ["--runtime", "io.containerd.runc.v2", "--runc-binary", "kata-ipu-runtime"]


class Env:
    def __init__(self, work: Path, reg: RegistryServer, ipud: IpuDaemon, ctd: Containerd,
                 shim_config: Path) -> None:
        self.work = work
        self.reg = reg
        self.ipud = ipud
        self.ctd = ctd
        self.shim_config = shim_config
        self.ref = f"{reg.address}/shim/busybox:v1"
        self.fresh_ref = f"{reg.address}/shim/busybox:v2"
        self.missing_ref = f"{reg.address}/shim/busybox:nope"
        self.full_ref = f"{reg.address}/shim/busybox:v3"

    def volumes(self) -> list[dict[str, object]]:
        out = subprocess.run([CLI, "--address", self.ipud.address, "ls", "--json"],
                             capture_output=True, text=True, check=True, timeout=60)
        result: list[dict[str, object]] = json.loads(out.stdout)
        return result

    def clone_loops(self) -> list[str]:
        data = str(self.ipud.root / "block" / "data")
        return [b.parent.parent.name for b in Path("/sys/block").glob("loop*/loop/backing_file")
                if b.read_text().strip().startswith(data)]

    def metric(self, name: str) -> float:
        """A metric's value, summed over its label sets."""
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$",
                                                self.ipud.metrics_text(), re.M))


def _write_shim_config(path: Path, work: Path, fallback: str = "error") -> Path:
    path.write_text(f'fallback = "{fallback}"\nsocket_dir = "{work}/s"\n'
                    f'[runtime]\nstate_dir = "{work}/runtime-state"\n')
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_root()
    require_programs("containerd", "ctr", "containerd-shim-runc-v2", "runc", "docker-registry",
                     "skopeo", "mkfs.ext4", "mkfs.xfs", "busybox")
    work = tmp_path_factory.mktemp("shim")
    for d in ("reg", "ipud", "ctd"):
        (work / d).mkdir()
    with RegistryServer(work / "reg") as reg:
        layout = OciLayout(work / "oci")
        base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
        layout.add_image([base, LayerBuilder().file("etc/motd", b"kata-ipu shim\n").build()],
                         ref="v1")
        layout.add_image([base, LayerBuilder().file("etc/motd", b"fresh\n").build()], ref="v2")
        layout.add_image([base, LayerBuilder().file("big", os.urandom(8 << 20)).build()],
                         ref="v3")
        for tag in ("v1", "v2", "v3"):
            push(work / "oci", tag, f"{reg.address}/shim/busybox:{tag}")
        ipud = IpuDaemon(work / "ipud", pool_size="2G", insecure_registries=(reg.address,))
        ipud.start()
        ctd: Containerd | None = None
        try:
            cfg = _write_shim_config(work / "shim.toml", work)
            # the in-process start (no kata-ipu-shimd; tests/root/test_shim_server.py has it)
            ctd = Containerd(work / "ctd", env={"KATA_IPU_ADDRESS": ipud.address,
                                                "KATA_IPU_DELEGATE": "runc",
                                                "KATA_IPU_SHIM_SERVER": "",
                                                "KATA_IPU_SHIM_CONFIG": str(cfg)}).start()
            e = Env(work, reg, ipud, ctd, cfg)
            for ref in (e.ref, e.fresh_ref):
                ctd.ctr("image", "pull", "--plain-http", ref, timeout=300)
            yield e
        finally:
            if ctd is not None:
                ctd.teardown()
                assert not mounts_under(ctd.workdir), "containerd mounts leaked"
            ipud.teardown()
    assert str(work) not in Path("/proc/mounts").read_text(), "mounts leaked"
    assert not [b for b in Path("/sys/block").glob("loop*/loop/backing_file")
                if b.read_text().strip().startswith(str(work))], "loop devices leaked"


def dead_shim_sockets() -> set[str]:
    """Socket files of the runc shims (/run/containerd/s) that nobody listens on."""
    out = set()
    for path in Path("/run/containerd/s").glob("*"):
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
            except OSError:
                out.add(path.name)
    return out


@pytest.fixture(autouse=True)
def nothing_leaks(env: Env) -> Iterator[None]:
    dead_before = dead_shim_sockets()
    yield
    assert dead_shim_sockets() <= dead_before, "dead shim sockets left in /run/containerd/s"
    env.ctd.cleanup_namespace()
    assert env.volumes() == [], "IPU volumes leaked"
    assert env.clone_loops() == [], "clone loop devices leaked"
    state = env.ctd.state
    assert not [m for m in mounts_under(state)], "bundle mounts leaked"
    assert not list((env.work / "s").glob("*.sock")), "proxy sockets left behind"
    assert not _proxies(env.ctd.namespace), "proxy processes left running"


def _proxies(namespace: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if any(a.endswith(b"/containerd-shim-kata-ipu-v2") for a in cmd) and (
                        namespace.encode() in cmd):
                    out.append(int(proc.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _task(ctd: Containerd, cid: str) -> tuple[int, str] | None:
    for line in ctd.ctr("task", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1]), parts[2]
    return None


def _wait_status(ctd: Containerd, cid: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (t := _task(ctd, cid)) is not None and t[1] != status:
        assert time.monotonic() < deadline, f"{cid} never reached {status}: {t}"
        time.sleep(0.05)


def _root_mount(pid: int) -> tuple[str, str]:
    """(source, fstype) of ``/`` as the container's own mount namespace shows it."""
    for line in Path(f"/proc/{pid}/mounts").read_text().splitlines():
        source, point, fstype = line.split()[:3]
        if point == "/":
            return source, fstype
    raise AssertionError(f"no / in /proc/{pid}/mounts")


def _assert_ipu_root(env: Env, pid: int, key: str) -> str:
    source, fstype = _root_mount(pid)
    assert (source.startswith("/dev/loop"), fstype) == (True, "ext4"), (source, fstype)
    backing = Path(f"/sys/block/{Path(source).name}/loop/backing_file").read_text().strip()
    assert backing.startswith(str(env.ipud.root)), backing
    volumes = {v["container_id"]: v for v in env.volumes()}
    assert volumes[key]["path"] == source
    return source


def _run_lifecycle(env: Env, cid: str, runtime_args: list[str]) -> str:
    ctd = env.ctd
    ctd.ctr("run", "-d", *runtime_args, "--annotation", f"{IMAGE_ANN}={env.ref}", env.ref, cid,
            "sleep", "600")
    task = _task(ctd, cid)
    assert task is not None and task[1] == "RUNNING"
    device = _assert_ipu_root(env, task[0], f"{ctd.namespace}.{cid}")
    exe = ctd.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c",
                  "cat /etc/motd; echo written > /root/f; exit 3", check=False)
    assert (exe.returncode, exe.stdout) == (3, "kata-ipu shim\n")
    ctd.ctr("task", "kill", "-s", "SIGKILL", cid)
    _wait_status(ctd, cid, "STOPPED")
    ctd.ctr("task", "delete", cid)
    assert _task(ctd, cid) is None
    assert env.volumes() == []
    assert not _alive(task[0])
    ctd.ctr("container", "rm", cid)
    return device


def test_shim_runs_the_container_on_the_ipu_device(env: Env) -> None:
    ctd = env.ctd
    out = ctd.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation", f"{IMAGE_ANN}={env.ref}",
                  env.ref, "shim-rm", "sh", "-c",
                  "grep ' / ' /proc/self/mounts; cat /etc/motd; exit 7", check=False)
    assert out.returncode == 7, out.stderr
    root, motd = out.stdout.splitlines()
    assert re.fullmatch(r"/dev/loop\d+ / ext4 rw,\S+ 0 0", root), root
    assert motd == "kata-ipu shim"
    assert _task(ctd, "shim-rm") is None and env.volumes() == []
    prepared = [json.loads(line[line.index("{"):]) for line in ctd.log_text().splitlines()
                if '"rootfs prepared"' in line and '"shim-rm"' in line]
    # over runc, the proxy mounted the device itself while the delegate started (the
    # container's / above is that mount), and Create carried no mounts
    assert [p["mounted"] for p in prepared] == [True], prepared
    assert "rootfs released" in ctd.log_text()
    _run_lifecycle(env, "shim-detached", ["--runtime", RUNTIME])


def test_runc_wrapper_runs_the_container_on_the_ipu_device(env: Env) -> None:
    ctd = env.ctd
    out = ctd.ctr("run", "--rm", *WRAPPER, "--annotation", f"{IMAGE_ANN}={env.ref}", env.ref,
                  "wrap-rm", "sh", "-c", "grep ' / ' /proc/self/mounts; exit 5", check=False)
    assert out.returncode == 5, out.stderr
    assert re.fullmatch(r"/dev/loop\d+ / ext4 rw,\S+ 0 0", out.stdout.strip()), out.stdout
    cid = "wrap-detached"
    ctd.ctr("run", "-d", *WRAPPER, "--annotation", f"{IMAGE_ANN}={env.ref}", env.ref, cid,
            "sleep", "600")
    task = _task(ctd, cid)
    assert task is not None
    device = _assert_ipu_root(env, task[0], f"{ctd.namespace}.{cid}")
    bundle = ctd.state / "io.containerd.runtime.v2.task" / ctd.namespace / cid
    assert f"{device} {bundle}/kata-ipu-rootfs ext4" in Path("/proc/mounts").read_text()
    assert json.loads((bundle / "config.json").read_text())["root"]["path"] == (
        f"{bundle}/kata-ipu-rootfs")
    ctd.ctr("task", "kill", "-s", "SIGKILL", cid)
    _wait_status(ctd, cid, "STOPPED")
    ctd.ctr("task", "delete", cid)
    assert f"{bundle}/kata-ipu-rootfs" not in Path("/proc/mounts").read_text()
    assert env.volumes() == []
    ctd.ctr("container", "rm", cid)


def test_twenty_concurrent_containers_one_pull_twenty_isolated_clones(env: Env) -> None:
    ctd = env.ctd
    builds = env.metric('kata_ipu_base_builds_total{result="ok"}')
    pulled = env.metric("kata_ipu_pull_bytes_total")
    ids = [f"many-{i}" for i in range(20)]

    def start(cid: str) -> subprocess.CompletedProcess[str]:
        return ctd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                       f"{IMAGE_ANN}={env.fresh_ref}", env.fresh_ref, cid, "sh", "-c",
                       f"echo {cid} > /root/mine; exec sleep 600", check=False, timeout=300)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(start, ids))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results]
    assert env.metric('kata_ipu_base_builds_total{result="ok"}') == builds + 1
    images = json.loads(subprocess.run([CLI, "--address", env.ipud.address, "images",
                                        "--json"], capture_output=True, text=True,
                                       check=True).stdout)
    fresh = next(i for i in images if i["name"] == env.fresh_ref)
    assert env.metric("kata_ipu_pull_bytes_total") - pulled <= float(fresh["size_bytes"])
    devices = set()
    for cid in ids:
        task = _task(ctd, cid)
        assert task is not None
        devices.add(_assert_ipu_root(env, task[0], f"{ctd.namespace}.{cid}"))
        seen = ctd.ctr("task", "exec", "--exec-id", "ls", cid, "sh", "-c",
                       "sleep 0.2; ls /root; cat /root/mine").stdout.split()
        assert seen == ["mine", cid], seen
    assert len(devices) == 20
    ctd.cleanup_namespace()


def test_image_missing_in_the_registry_fails_create_with_the_reason(env: Env) -> None:
    out = env.ctd.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                      f"{IMAGE_ANN}={env.missing_ref}", env.ref, "missing", "true", check=False)
    assert out.returncode != 0
    assert f"Prepare of {env.missing_ref}" in out.stderr and "not found" in out.stderr.lower()
    errors = [json.loads(line) for line in env.ctd.log_text().splitlines()
              if line.startswith("{") and '"level":"error"' in line]
    assert any(e.get("container_id") == "missing" and env.missing_ref in e["msg"]
               for e in errors), errors
    assert _task(env.ctd, "missing") is None


def test_no_image_annotation_is_refused_and_a_cri_sandbox_is_left_alone(env: Env) -> None:
    out = env.ctd.ctr("run", "--rm", "--runtime", RUNTIME, env.ref, "noimg", "true",
                      check=False)
    assert out.returncode != 0 and "no image annotation" in out.stderr
    out = env.ctd.ctr("run", "--rm", *WRAPPER, env.ref, "noimg2", "true", check=False)
    assert out.returncode != 0 and "no image annotation" in out.stderr
    # the pause container of a pod keeps containerd's snapshot, even with an image name
    for i, runtime in enumerate((["--runtime", RUNTIME], WRAPPER)):
        out = env.ctd.ctr("run", "--rm", *runtime, "--annotation",
                          "io.kubernetes.cri.container-type=sandbox", "--annotation",
                          f"io.kubernetes.cri.image-name={env.ref}", env.ref, f"pause{i}",
                          "sh", "-c", "grep ' / ' /proc/self/mounts", check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("overlay / overlay"), out.stdout


def test_pool_full_fails_create_and_leaves_nothing(env: Env) -> None:
    data = env.ipud.root / "block" / "data"
    fillers = []
    try:
        for i in range(5):  # XFS frees released clones in the background: fill until full
            subprocess.run(["sync", "-f", str(data)], check=True)
            st = os.statvfs(data)
            free = st.f_bavail * st.f_frsize
            if free < (512 << 10):
                break
            fillers.append(data / f"filler{i}")
            subprocess.run(["fallocate", "-l", str(free - (256 << 10)), str(fillers[-1])],
                           check=True)
        # an image the IPU has not built yet: its base cannot be written into the full pool
        out = env.ctd.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                          f"{IMAGE_ANN}={env.full_ref}", env.ref, "full", "true", check=False)
    finally:
        for f in fillers:
            f.unlink()
    assert out.returncode != 0
    assert f"Prepare of {env.full_ref}" in out.stderr
    assert "pool full" in out.stderr or "No space left on device" in out.stderr, out.stderr
    assert _task(env.ctd, "full") is None
    assert re.search(r'"level":"error","msg":"kata-ipu: Prepare of \S+:v3 for \S+\.full failed',
                     env.ctd.log_text())


@pytest.mark.parametrize("victim", ["proxy", "delegate"])
def test_shim_killed_with_sigkill_then_task_delete_releases_everything(env: Env,
                                                                       victim: str) -> None:
    ctd = env.ctd
    cid = f"killed-{victim}"
    ctd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"{IMAGE_ANN}={env.ref}",
            env.ref, cid, "sleep", "600")
    task = _task(ctd, cid)
    assert task is not None
    _assert_ipu_root(env, task[0], f"{ctd.namespace}.{cid}")
    proxies = _proxies(ctd.namespace)
    assert len(proxies) == 1
    bundle = ctd.state / "io.containerd.runtime.v2.task" / ctd.namespace / cid
    delegate = json.loads((bundle / "kata-ipu-shim.json").read_text())["delegate_pid"]
    assert os.readlink(f"/proc/{delegate}/exe").endswith("containerd-shim-runc-v2")
    os.kill(proxies[0] if victim == "proxy" else delegate, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (t := _task(ctd, cid)) is not None and t[1] == "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    res = ctd.ctr("task", "delete", cid, check=False)
    assert res.returncode == 0 or "not found" in res.stderr, res.stderr
    assert _task(ctd, cid) is None
    # containerd runs the shim's ``delete`` action in the background: wait for its effects
    while _alive(task[0]) or env.volumes() or _alive(delegate) or _proxies(ctd.namespace):
        assert time.monotonic() < deadline, "the container, its volume or a shim outlived it"
        time.sleep(0.1)
    assert "rootfs released after a dead shim" in ctd.log_text()
    assert env.volumes() == []
    assert re.search(rf'cleaning up after shim disconnected" id={cid}', ctd.log_text())
    ctd.ctr("container", "rm", cid)


@pytest.mark.parametrize("fallback", ["error", "passthrough"])
def test_daemon_down(env: Env, fallback: str, tmp_path: Path) -> None:
    cfg = _write_shim_config(tmp_path / "shim.toml", env.work, fallback)
    with Containerd(tmp_path / "ctd", env={"KATA_IPU_ADDRESS": f"unix://{tmp_path}/none.sock",
                                           "KATA_IPU_DELEGATE": "runc",
                                           "KATA_IPU_SHIM_CONFIG": str(cfg)},
                    namespace=f"down-{uuid.uuid4().hex[:6]}") as ctd:
        ctd.ctr("image", "pull", "--plain-http", env.ref, timeout=300)
        out = ctd.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                      f"{IMAGE_ANN}={env.ref}", env.ref, "down", "sh", "-c",
                      "grep ' / ' /proc/self/mounts", check=False)
        log = ctd.log_text()
        if fallback == "error":
            assert out.returncode != 0
            assert "IPU service at" in out.stderr and "unreachable" in out.stderr
            assert re.search(r'\{"time":[^\n]*"level":"error","msg":"kata-ipu: the IPU '
                             r'service at unix://\S+ is unreachable', log), log[-2000:]
        else:
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith("overlay / overlay")
            assert '"level":"warning","msg":"IPU rootfs unavailable' in log
        assert _task(ctd, "down") is None
    assert not mounts_under(tmp_path)


def run_pod(ctd: Containerd, ref: str, pod: str) -> dict[str, int]:
    """A CRI-style pod through ``ctr``: a pause container and two app containers of the
    same sandbox (the runc shim groups them into one shim, so one proxy serves all three).
    Returns the tasks' pids."""
    ctd.ctr("run", "-d", "--runtime", RUNTIME,
            "--annotation", "io.kubernetes.cri.container-type=sandbox",
            "--annotation", f"io.kubernetes.cri.sandbox-id={pod}", ref, pod, "sleep", "600")
    for app in (f"{pod}-a", f"{pod}-b"):
        ctd.ctr("run", "-d", "--runtime", RUNTIME,
                "--annotation", "io.kubernetes.cri.container-type=container",
                "--annotation", f"io.kubernetes.cri.sandbox-id={pod}",
                "--annotation", f"{IMAGE_ANN}={ref}", ref, app, "sleep", "600")
    pids = {}
    for cid in (pod, f"{pod}-a", f"{pod}-b"):
        task = _task(ctd, cid)
        assert task is not None and task[1] == "RUNNING", (cid, task)
        pids[cid] = task[0]
    return pids


def stop_pod(ctd: Containerd, pod: str) -> None:
    for cid in (f"{pod}-a", f"{pod}-b", pod):  # the apps first, as the kubelet does
        ctd.ctr("task", "kill", "-s", "SIGKILL", cid)
        _wait_status(ctd, cid, "STOPPED")
        ctd.ctr("task", "delete", cid)
        ctd.ctr("container", "rm", cid)


def test_a_pods_containers_share_one_proxy_and_each_gets_its_own_rootfs(env: Env) -> None:
    ctd = env.ctd
    before = env.metric("kata_ipu_prepare_seconds_count")
    pids = run_pod(ctd, env.ref, "pod1")
    assert _root_mount(pids["pod1"])[1] == "overlay"  # the pause container keeps its own
    devices = {_assert_ipu_root(env, pids[c], f"{ctd.namespace}.{c}")
               for c in ("pod1-a", "pod1-b")}
    assert len(devices) == 2
    # one delegate, one proxy, one address for the whole pod...
    state = ctd.state / "io.containerd.runtime.v2.task" / ctd.namespace
    addresses = {(state / c / "address").read_text() for c in pids}
    assert len(addresses) == 1, addresses
    # ...and the runc shim's own start answered for the app containers what kata-ipu-shimd
    # computes to join a group without running it (containerd's shim.SocketAddress)
    args = argparse.Namespace(address=str(ctd.socket), namespace=ctd.namespace)
    for app in ("pod1-a", "pod1-b"):
        record = json.loads((state / app / "kata-ipu-shim.json").read_text())
        spec = json.loads((state / app / "config.json").read_text())
        assert shim.group_delegate_address(args, spec, app) == record["delegate_address"]
    assert shim.group_delegate_address(args, json.loads((state / "pod1" / "config.json")
                                                        .read_text()), "pod1") is None
    assert len(_proxies(ctd.namespace)) == 1
    # ...and exactly one Prepare per app container (none made and thrown away at start)
    assert env.metric("kata_ipu_prepare_seconds_count") - before == 2
    stop_pod(ctd, "pod1")
    assert env.volumes() == []


def test_tearing_a_pod_down_sandbox_first_releases_everything(env: Env) -> None:
    run_pod(env.ctd, env.ref, "pod2")
    env.ctd.cleanup_namespace()  # kills and deletes in name order: the sandbox first
    assert env.volumes() == []
