"""kata-ipu-shimd: containerd's ``start`` of the kata-ipu shim handed to the resident server.

Real containerd (Debian's 1.6) on a private socket, its runc shim and runc, the registry,
kata-ipud and the server, started with resource limits containerd does not have, so that a
container that inherits the server's context instead of containerd's is caught. Both
launchers are driven by containerd: the Python console script and the native one
(scripts/build-launcher) put first on containerd's PATH. The oracles are the kernel's: the
container's ``/proc/<pid>/mounts`` and ``limits``, the proxy's parent pid, ``/proc/mounts``
and the daemon's volume list for leaks.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kata_ipu.testing.containerd import Containerd, mounts_under
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer, push
from kata_ipu.testing.shimd import ShimServer
from kata_ipu.testing.wait import until
from shim_hooks import handoff
from shim_hooks.shim import PROXY_NAME
from tests.root.test_shim_containerd import _root_mount, _task, _wait_status, run_pod, stop_pod

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = "io.containerd.kata-ipu.v2"
IMAGE_ANN = "io.katacontainers.ipu.image"
SERVER = str(Path(sys.executable).with_name("kata-ipu-shimd"))
CLI = str(Path(sys.executable).with_name("kata-ipu"))
# RLIMIT_CORE of the server (a soft limit containerd does not have; raising a hard limit
# needs CAP_SYS_RESOURCE, which a nested container's root may lack)
SERVER_CORE_SOFT = 4096


def slow_exit(command: str) -> tuple[str, str, str]:
    """ctr can lose the output of a process that exits at once (its copy races the task's
    end): ``sh -c "<command>; sleep 0.2"`` leaves it the time."""
    return ("sh", "-c", f"{command}; sleep 0.2")


class Server(ShimServer):
    """kata-ipu-shimd on a private socket, with limits that differ from containerd's."""

    def __init__(self, work: Path) -> None:
        super().__init__(work)

    def start(self, *extra: str, env: Mapping[str, str] | None = None,
              preexec: Callable[[], None] | None = None, timeout: float = 30) -> Server:
        def limits() -> None:
            hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
            resource.setrlimit(resource.RLIMIT_CORE, (SERVER_CORE_SOFT, hard))

        super().start(*extra, env=env, preexec=preexec or limits, timeout=timeout)
        return self


class Env:
    def __init__(self, work: Path, ipud: IpuDaemon, ref: str) -> None:
        self.work = work
        self.ipud = ipud
        self.ref = ref

    def volumes(self) -> list[str]:
        out = subprocess.run([CLI, "--address", self.ipud.address, "ls", "--json"],
                             capture_output=True, text=True, check=True, timeout=60)
        return [str(v["container_id"]) for v in json.loads(out.stdout)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_root()
    require_programs("containerd", "ctr", "containerd-shim-runc-v2", "runc", "docker-registry",
                     "skopeo", "mkfs.ext4", "mkfs.xfs", "busybox", "cc")
    work = tmp_path_factory.mktemp("shimd")
    for d in ("reg", "ipud"):
        (work / d).mkdir()
    with RegistryServer(work / "reg") as reg:
        layout = OciLayout(work / "oci")
        base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
        layout.add_image([base, LayerBuilder().file("etc/motd", b"via kata-ipu-shimd\n")
                          .build()], ref="v1")
        push(work / "oci", "v1", f"{reg.address}/shimd/busybox:v1")
        ipud = IpuDaemon(work / "ipud", pool_size="2G", insecure_registries=(reg.address,))
        ipud.start()
        try:
            (work / "shim.toml").write_text(f'socket_dir = "{work}/s"\n')
            subprocess.run([str(ROOT / "scripts" / "build-launcher"),
                            str(work / "native" / "containerd-shim-kata-ipu-v2"),
                            str(Path(sys.executable).with_name("containerd-shim-kata-ipu-v2"))],
                           check=True, capture_output=True, timeout=120)
            yield Env(work, ipud, f"{reg.address}/shimd/busybox:v1")
        finally:
            ipud.teardown()
    assert str(work) not in Path("/proc/mounts").read_text(), "mounts leaked"


@pytest.fixture
def server(env: Env, tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path).start()
    yield s
    s.stop()


def _containerd(env: Env, server: Server, workdir: Path, delegate: str,
                bin_dirs: tuple[str, ...] = ()) -> Containerd:
    """A started containerd whose shims use ``server`` and the module's kata-ipud."""
    return Containerd(workdir, bin_dirs=bin_dirs, env={
        "KATA_IPU_ADDRESS": env.ipud.address, "KATA_IPU_DELEGATE": delegate,
        "KATA_IPU_SHIM_CONFIG": str(env.work / "shim.toml"),
        "KATA_IPU_SHIM_SERVER": str(server.socket)}).start()


@pytest.fixture(params=["python", "native"])
def ctd(request: pytest.FixtureRequest, env: Env, server: Server) -> Iterator[Containerd]:
    bins = [str(Path(sys.executable).parent)]
    if request.param == "native":
        bins.insert(0, str(env.work / "native"))
    c = _containerd(env, server, env.work / f"ctd-{request.param}", "runc", tuple(bins))
    try:
        c.ctr("image", "pull", "--plain-http", env.ref, timeout=300)
        yield c
    finally:
        c.teardown()
        assert not mounts_under(c.workdir), "containerd mounts leaked"
    assert env.volumes() == [], "IPU volumes leaked"
    assert not _proxies_under(c.workdir), "proxy processes left running"


def _proxies_under(workdir: Path) -> list[int]:
    """kata-ipu proxies whose working directory (their bundle) is under ``workdir``."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if ((proc / "comm").read_text().strip() == PROXY_NAME and
                        os.readlink(proc / "cwd").startswith(str(workdir))):
                    out.append(int(proc.name))
    return out


def _limits(pid: int, name: str) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            soft, hard = line[len(name):].split()[:2]
            return soft, hard
    raise AssertionError(f"{name} not in /proc/{pid}/limits")


def _as_limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def test_start_through_the_server_runs_on_the_ipu_device_in_containerds_context(
        env: Env, server: Server, ctd: Containerd) -> None:
    cid = "srv1"
    run = ctd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"{IMAGE_ANN}={env.ref}",
                  env.ref, cid, "sleep", "600", check=False)
    assert run.returncode == 0, (run.stderr, server.log.read_text()[-3000:])
    task = _task(ctd, cid)
    assert task is not None and task[1] == "RUNNING"
    source, fstype = _root_mount(task[0])
    assert (source.startswith("/dev/loop"), fstype) == (True, "ext4"), (source, fstype)
    assert env.volumes() == [f"{ctd.namespace}.{cid}"]
    # the proxy is the server's child, not a process containerd started
    (proxy,) = _proxies_under(ctd.workdir)
    assert proxy in server.children()
    # ...yet everything below it runs in containerd's context, not the server's
    assert _limits(proxy, "Max core file size") == _limits(ctd.proc.pid if ctd.proc else 0,
                                                           "Max core file size")
    core = tuple(_as_limit(v) for v in resource.getrlimit(resource.RLIMIT_CORE))
    assert _limits(task[0], "Max core file size") == core
    assert core[0] != str(SERVER_CORE_SOFT)
    assert _limits(server.pid, "Max core file size")[0] == str(SERVER_CORE_SOFT)
    exe = ctd.ctr("task", "exec", "--exec-id", "e1", cid, *slow_exit("cat /etc/motd"),
                  check=False)
    assert (exe.returncode, exe.stdout) == (0, "via kata-ipu-shimd\n")
    ctd.ctr("task", "kill", "-s", "SIGKILL", cid)
    _wait_status(ctd, cid, "STOPPED")
    ctd.ctr("task", "delete", cid)
    ctd.ctr("container", "rm", cid)
    assert env.volumes() == []


def test_a_pod_through_the_server_one_proxy_one_prepare_per_app(
        env: Env, server: Server, ctd: Containerd) -> None:
    pids = run_pod(ctd, env.ref, "pod")
    assert _root_mount(pids["pod"])[1] == "overlay"
    assert {_root_mount(pids[c])[1] for c in ("pod-a", "pod-b")} == {"ext4"}
    (proxy,) = _proxies_under(ctd.workdir)
    assert proxy in server.children()
    assert sorted(env.volumes()) == [f"{ctd.namespace}.pod-a", f"{ctd.namespace}.pod-b"]
    stop_pod(ctd, "pod")
    assert env.volumes() == []


def test_concurrent_starts_through_the_server(env: Env, server: Server,
                                              ctd: Containerd) -> None:
    def run(i: int) -> subprocess.CompletedProcess[str]:
        return ctd.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                       f"{IMAGE_ANN}={env.ref}", env.ref, f"conc{i}", "sh", "-c",
                       "head -n1 /etc/motd; grep ' / ' /proc/mounts | cut -d' ' -f1-3; "
                       "sleep 0.2",
                       check=False, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    devices = set()
    for r in results:
        assert r.stdout.count("\n") == 2, (r.stdout, r.stderr)
        motd, mount = r.stdout.split("\n", 1)
        assert motd == "via kata-ipu-shimd"
        device, point, fstype = mount.split()
        assert (device.startswith("/dev/loop"), point, fstype) == (True, "/", "ext4")
        devices.add(device)
    assert len(devices) >= 2  # not one shared device (loops are reused only once released)
    assert '"hand-off"' in server.log.read_text()


def test_a_start_that_finds_no_idle_spare_gets_one_forked_at_once(env: Env,
                                                                  tmp_path: Path) -> None:
    """The replacement of a used spare is forked late (--refill-delay), but a start that
    arrives before that must not wait for it: with an hour's delay, back-to-back containers
    only run if the waiting start makes the server fork."""
    (tmp_path / "shimd").mkdir()
    server = Server(tmp_path / "shimd").start("--refill-delay", "3600")
    c = _containerd(env, server, tmp_path / "ctd", "runc",
                    (str(env.work / "native"), str(Path(sys.executable).parent)))
    try:
        c.ctr("image", "pull", "--plain-http", env.ref, timeout=300)
        for i in range(3):
            out = c.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                        f"{IMAGE_ANN}={env.ref}", env.ref, f"late{i}", "sh", "-c",
                        "head -n1 /etc/motd", timeout=60, check=False)
            assert (out.returncode, out.stdout.strip()) == (0, "via kata-ipu-shimd"), out.stderr
        assert server.log.read_text().count('"hand-off"') >= 3
    finally:
        c.teardown()
        server.stop()
    assert env.volumes() == []


def _wait_for(what: str, predicate: Callable[[], object], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_delete_runs_in_a_child_of_the_server_and_the_spare_stays(tmp_path: Path) -> None:
    """A spare never forks (a fork marks its pages copy-on-write again, and its next start
    faults on each): the spare that takes a ``delete`` passes it on to the server, which runs
    it in a child of its own, while the same spare stays idle for the next start."""
    require_root()
    (tmp_path / "shimd").mkdir()
    server = Server(tmp_path / "shimd").start()
    bundle, stubs = tmp_path / "bundle", tmp_path / "stubs"
    bundle.mkdir()
    stubs.mkdir()
    # the delegate's own delete, slow enough to be seen in the process tree
    stub = stubs / "containerd-shim-runc-v2"
    stub.write_text(f"#!/bin/sh\ntouch {tmp_path}/deleting\nsleep 3\n")
    stub.chmod(0o755)
    try:
        _wait_for("no spare was forked", server.children)
        (spare,) = server.children()
        launcher = subprocess.Popen(
            [str(Path(sys.executable).with_name("containerd-shim-kata-ipu-v2")), "-namespace",
             "ns", "-id", "gone", "-bundle", str(bundle), "delete"], cwd=bundle,
            env={**os.environ, "KATA_IPU_SHIM_SERVER": str(server.socket),
                 "KATA_IPU_DELEGATE": "runc", "PATH": f"{stubs}:{os.environ['PATH']}"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for("the delegate's delete did not run", (tmp_path / "deleting").exists)
        (delegate,) = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                       and str(stub) in _cmdline(int(p.name))]
        runner = _ppid(delegate)  # the process running our delete action
        assert runner != spare
        assert _ppid(runner) == server.pid, "the delete does not run in a child of the server"
        assert spare in server.children()
        assert not Path(f"/proc/{spare}/task/{spare}/children").read_text().split(), \
            "the spare forked"
        out, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, err
        assert out, "no DeleteResponse on stdout"
        assert '"hand-off"' in server.log.read_text()  # served by the server, not in-process
        assert server.children() == [spare]  # the same spare, still idle
    finally:
        server.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def _connected_to(pid: int, socket_path: Path) -> bool:
    """Does process ``pid`` hold a connection to the unix socket listening at
    ``socket_path`` (the kernel's view, through ss)?"""
    out = subprocess.run(["ss", "-xpnH"], capture_output=True, text=True, check=True,
                         timeout=30).stdout.splitlines()
    peers = set()  # the inodes at the other end of pid's connections
    for line in out:
        f = line.split()
        if f"pid={pid}," in line and len(f) >= 8:
            peers.add(f[7])
    return any(f[4] == str(socket_path) and f[5] in peers
               for f in (line.split() for line in out) if len(f) >= 8)


def test_a_spare_prepares_on_a_connection_it_kept_and_gets_over_a_daemon_restart(
        env: Env, tmp_path: Path) -> None:
    """An idle spare connects to kata-ipud ahead (the server reads the shims' configuration);
    the next Prepare uses that connection. When the daemon restarted meanwhile, the dead
    connection is replaced and the container starts all the same."""
    (tmp_path / "shimd").mkdir()
    shim_env = {"KATA_IPU_ADDRESS": env.ipud.address,
                "KATA_IPU_SHIM_CONFIG": str(env.work / "shim.toml")}
    server = Server(tmp_path / "shimd").start(env=shim_env)
    c = _containerd(env, server, tmp_path / "ctd", "runc",
                    (str(env.work / "native"), str(Path(sys.executable).parent)))
    ipud_socket = Path(env.ipud.address.removeprefix("unix://"))

    def spare_connected() -> bool:
        deadline = time.monotonic() + 30  # a spare connects at the end of its warm-up
        while time.monotonic() < deadline:
            if any(_connected_to(p, ipud_socket) for p in server.children()):
                return True
            time.sleep(0.1)
        return False

    def run(cid: str) -> None:
        out = c.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                    f"{IMAGE_ANN}={env.ref}", env.ref, cid, "sh", "-c",
                    "grep ' / ' /proc/mounts | cut -d' ' -f1", timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("/dev/loop"), out.stdout

    try:
        c.ctr("image", "pull", "--plain-http", env.ref, timeout=300)
        assert spare_connected()
        run("kept1")
        assert spare_connected()  # the replacement spare connected again
        env.ipud.stop()
        env.ipud.start()
        run("kept2")  # its kept connection died with the old daemon
        assert env.volumes() == []
        # a start with nothing to prepare (a pod's sandbox) must not keep the connection for
        # its proxy's lifetime
        c.ctr("run", "-d", "--runtime", RUNTIME,
              "--annotation", "io.kubernetes.cri.container-type=sandbox",
              "--annotation", "io.kubernetes.cri.sandbox-id=keptpod", env.ref, "keptpod",
              "sleep", "600")
        (proxy,) = _proxies_under(c.workdir)
        assert spare_connected()  # the server's next spare has its own, as before
        assert not _connected_to(proxy, ipud_socket)
        # a container that joins the pod's proxy (Expect): the proxy then keeps one for the
        # pod's next container
        out = c.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation", f"{IMAGE_ANN}={env.ref}",
                    "--annotation", "io.kubernetes.cri.container-type=container",
                    "--annotation", "io.kubernetes.cri.sandbox-id=keptpod", env.ref, "keptapp",
                    "sh", "-c", "grep ' / ' /proc/mounts | cut -d' ' -f1", timeout=120,
                    check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("/dev/loop"), out.stdout
        assert _proxies_under(c.workdir) == [proxy]  # it joined, no proxy of its own
        assert until(lambda: _connected_to(proxy, ipud_socket), 10)
        c.ctr("task", "kill", "-s", "SIGKILL", "keptpod")
        _wait_status(c, "keptpod", "STOPPED")
        c.ctr("task", "delete", "keptpod")
        c.ctr("container", "rm", "keptpod")
    finally:
        c.teardown()
        server.stop()
        if env.ipud.proc is None:
            env.ipud.start()


def test_killed_server_leaves_running_containers_alone_and_start_falls_back(
        env: Env, server: Server, ctd: Containerd) -> None:
    cid = "srvkill"
    ctd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"{IMAGE_ANN}={env.ref}",
            env.ref, cid, "sleep", "600")
    spares = server.children()
    server.stop(signal.SIGKILL)
    # the idle spare notices and exits; the proxy serves on
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() and p not in _proxies_under(ctd.workdir)
              for p in spares):
        assert time.monotonic() < deadline, "an idle spare outlived the server"
        time.sleep(0.05)
    assert server.socket.exists() and not server.serving()
    ctd.ctr("task", "kill", "-s", "SIGKILL", cid)
    _wait_status(ctd, cid, "STOPPED")
    ctd.ctr("task", "delete", cid)
    ctd.ctr("container", "rm", cid)
    assert env.volumes() == []
    # no server: the launcher runs the start in-process
    out = ctd.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                  f"{IMAGE_ANN}={env.ref}", env.ref, "after", *slow_exit("cat /etc/motd"))
    assert out.stdout == "via kata-ipu-shimd\n"


def test_proxy_killed_then_task_delete_releases_through_the_servers_delete(
        env: Env, server: Server, ctd: Containerd) -> None:
    cid = "srvdel"
    ctd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"{IMAGE_ANN}={env.ref}",
            env.ref, cid, "sleep", "600")
    (proxy,) = _proxies_under(ctd.workdir)
    spares = set(server.children()) - {proxy}
    os.kill(proxy, signal.SIGKILL)
    # containerd sees the shim gone and runs `delete`, which the launcher hands to the server:
    # it stops the orphaned delegate and releases the volume
    deadline = time.monotonic() + 60
    while env.volumes():
        assert time.monotonic() < deadline, "the volume of the dead shim was not released"
        time.sleep(0.1)
    handoffs = [line for line in server.log.read_text().splitlines() if '"hand-off"' in line]
    assert any(f'/{cid}","delete"]' in line for line in handoffs), handoffs
    assert spares <= set(server.children()), "a delete used up the warm spare"
    ctd.ctr("task", "delete", "-f", cid, check=False)
    ctd.ctr("container", "rm", cid)


def test_bad_hand_offs_are_refused_and_the_server_keeps_serving(
        env: Env, server: Server, tmp_path: Path) -> None:
    for message, fds in [(b"garbage", [0, 1, 2]), (b"kata-ipu-shim-start/1\x001\x00a\x000\x00/",
                                                   [])]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(str(server.socket))
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                    b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))] if fds else []
            s.sendmsg([message], anc)
            s.settimeout(10)
            assert s.recv(16) == b""  # refused: closed without a status
    log = server.log.read_text()
    assert "not a kata-ipu start hand-off" in log and "0 descriptors instead of 3" in log
    # still serving a real start (through containerd)
    c = _containerd(env, server, tmp_path / "ctd", "runc")
    try:
        c.ctr("image", "pull", "--plain-http", env.ref, timeout=300)
        out = c.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                    f"{IMAGE_ANN}={env.ref}", env.ref, "good", *slow_exit("cat /etc/motd"))
        assert out.stdout == "via kata-ipu-shimd\n"
    finally:
        c.teardown()
    assert env.volumes() == []


def test_a_failing_start_reports_its_reason_through_the_server(
        env: Env, server: Server, tmp_path: Path) -> None:
    # Kata is not installed here: the delegate cannot be found
    c = _containerd(env, server, tmp_path / "ctd", "kata")
    try:
        c.ctr("image", "pull", "--plain-http", env.ref, timeout=300)
        out = c.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                    f"{IMAGE_ANN}={env.ref}", env.ref, "nokata", "true", check=False)
        assert out.returncode != 0
        assert "containerd-shim-kata-v2: not found in $PATH" in out.stderr, out.stderr
    finally:
        c.teardown()
    assert env.volumes() == []
    assert server.serving()
    assert not _proxies_under(tmp_path)


def test_lifecycle_ready_one_spare_and_a_clean_stop(tmp_path: Path) -> None:
    require_root()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    sock = tmp_path / "shimd.sock"
    proc = subprocess.Popen([SERVER, "--socket", str(sock)],
                            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                            stderr=subprocess.PIPE)
    try:
        assert b"READY=1" in notify.recv(4096)
        assert sock.stat().st_mode & 0o777 == 0o600
        deadline = time.monotonic() + 10
        while not (children := Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                   .read_text().split()):
            assert time.monotonic() < deadline, "no spare was forked"
            time.sleep(0.02)
        (spare,) = map(int, children)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert b"STOPPING=1" in notify.recv(4096)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert not sock.exists()
    assert not Path(f"/proc/{spare}").exists(), "the idle spare outlived the server"
    assert b"kata-ipu-shimd stopped" in (proc.stderr.read() if proc.stderr else b"")


def test_a_second_server_on_the_same_socket_is_refused(server: Server) -> None:
    out = subprocess.run([SERVER, "--socket", str(server.socket)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert "another kata-ipu-shimd is serving there" in out.stderr
    assert server.serving()


def test_a_start_from_another_user_is_refused() -> None:
    require_root()
    # a directory "nobody" can traverse (pytest's are 0700)
    work = Path(tempfile.mkdtemp(prefix="kipu-shimd-", dir="/tmp"))
    work.chmod(0o755)
    server = Server(work).start()
    try:
        os.chmod(server.socket, 0o777)  # only to get past the file mode to the uid check

        def as_nobody() -> None:
            os.setgid(65534)
            os.setuid(65534)

        message = handoff.encode(["x", "start"], {}, b"/")
        code = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            f"s.connect({str(server.socket)!r})\n"
            "fds = b''.join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))\n"
            "try:\n"
            f"    s.sendmsg([{message!r}], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])\n"
            "    print('status', repr(s.recv(16)))\n"
            # closed by the server's peer check: before the message went out (an idle spare
            # was already waiting in accept) or with it unread
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    print('status', repr(b''))\n")
        out = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True,
                             text=True, timeout=60, check=False, cwd="/",
                             preexec_fn=as_nobody)
        assert out.stdout.strip() == "status b''", out.stderr  # no status: refused
        assert "peer uid 65534 is not 0" in server.log.read_text()
        assert server.serving()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
