"""A kubelet's-eye node for tests: a real containerd (Debian's 1.6) with its CRI plugin on.

:class:`CriNode` wraps :class:`kata_ipu.testing.containerd.Containerd` (private socket, root,
state dir) and adds the ``[plugins."io.containerd.grpc.v1.cri"]`` tables through its
``extra_config``. What that config says, and why:

* ``sandbox_image``: the pause image, from the test's own registry (:func:`publish_pause_image`
  builds one from busybox-static); the CRI plugin pulls it at the first RunPodSandbox.
* ``registry.config_path``: a ``certs.d`` dir under the workdir with a ``hosts.toml`` per
  registry saying ``server = "http://ADDR"``, so plain-HTTP 127.0.0.1 registries work.
* ``containerd.snapshotter`` (1.6 has one snapshotter for every runtime handler),
  ``containerd.disable_snapshot_annotations`` (1.6 defaults it to true; we default to false
  so that a remote snapshotter sees the CRI's layer annotations) and ``[proxy_plugins.NAME]``
  for out-of-process snapshotters (their sockets must already listen when containerd starts:
  containerd dials them while loading plugins, and the CRI plugin refuses to load if its
  snapshotter is missing).
* ``containerd.runtimes.runc`` (``io.containerd.runc.v2``) as ``default_runtime_name``, plus
  ``runtimes_toml`` appended verbatim for further handlers.
* ``restrict_oom_score_adj = true``: the CRI gives sandboxes oom_score_adj -998, which needs
  CAP_SYS_RESOURCE; restricted, it never goes below containerd's own.
* ``disable_apparmor = true`` and ``enable_selinux = false``: no LSM profiles to install.
* ``cni.conf_dir``/``cni.bin_dir`` under the workdir: 1.6 *creates* the conf dir (default
  ``/etc/cni/net.d``) to watch it. There is no CNI here, so pods must use the host network
  (``NetworkReady`` stays false, which the CRI tolerates for host-network pods).
* ``netns_mounts_under_state_dir = true``: if a pod ever gets its own netns, it is pinned
  under the state dir rather than ``/var/run/netns``.
* ``stream_server_address = "127.0.0.1"``, ``stream_server_port = "0"``: the exec/attach
  streaming server takes a free port, so nodes never clash.

The CRI plugin keeps its files under containerd's root and state
(``io.containerd.grpc.v1.cri``), which live under the workdir. Its containers are in the
``k8s.io`` namespace. :meth:`CriNode.teardown` stops and removes every container and pod
sandbox through CRI, then lets :meth:`Containerd.teardown` kill what is left and unmount
everything under its dirs; it is idempotent and safe after any failure.

:func:`host_cost` samples what a process has cost the host so far (CPU, storage I/O) and what a
directory takes on disk; :class:`HostCost` differences measure one operation, e.g. a PullImage.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kata_ipu.testing.containerd import Containerd
from kata_ipu.testing.cri import DEFAULT_DEADLINE, PULL_DEADLINE, CriClient, CriError
from kata_ipu.testing.ocibuild import BuiltImage, LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.registry import RegistryServer, push

CRI = '"io.containerd.grpc.v1.cri"'
CRI_NAMESPACE = "k8s.io"
PAUSE_ENTRYPOINT = ("/bin/sh", "-c",
                    "trap 'exit 0' TERM INT; while :; do sleep 1 & wait $!; done")
"""Waits forever; exits 0 on SIGTERM/SIGINT (a trap makes PID 1 receive them)."""


def _toml_str(value: str | os.PathLike[str]) -> str:
    text = os.fspath(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hosts_toml(address: str) -> str:
    """A containerd ``hosts.toml`` for a plain-HTTP registry at ``address`` (host:port)."""
    return (f'server = "http://{address}"\n\n'
            f'[host."http://{address}"]\n'
            '  capabilities = ["pull", "resolve", "push"]\n')


def write_registry_hosts(certs_d: Path, registries: Sequence[str]) -> Path:
    """``certs_d/<address>/hosts.toml`` for each registry; returns ``certs_d``."""
    for address in registries:
        (certs_d / address).mkdir(parents=True, exist_ok=True)
        (certs_d / address / "hosts.toml").write_text(hosts_toml(address))
    return certs_d


def cri_config(workdir: Path, *, sandbox_image: str, certs_d: Path,
               snapshotter: str = "overlayfs", disable_snapshot_annotations: bool = False,
               proxy_plugins: Mapping[str, Path] | None = None, runtimes_toml: str = "",
               default_runtime: str = "runc") -> str:
    """The TOML (containerd config version 2) that :class:`CriNode` appends."""
    cri = f"[plugins.{CRI}]"
    lines = [
        cri,
        f"  sandbox_image = {_toml_str(sandbox_image)}",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  disable_tcp_service = true",
        "  restrict_oom_score_adj = true",
        "  disable_apparmor = true",
        "  enable_selinux = false",
        "  netns_mounts_under_state_dir = true",
        "  max_container_log_line_size = 16384",
        f"[plugins.{CRI}.containerd]",
        f"  snapshotter = {_toml_str(snapshotter)}",
        f"  default_runtime_name = {_toml_str(default_runtime)}",
        f"  disable_snapshot_annotations = {str(disable_snapshot_annotations).lower()}",
        f"[plugins.{CRI}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"[plugins.{CRI}.cni]",
        f"  bin_dir = {_toml_str(workdir / 'cni' / 'bin')}",
        f"  conf_dir = {_toml_str(workdir / 'cni' / 'net.d')}",
        f"[plugins.{CRI}.registry]",
        f"  config_path = {_toml_str(certs_d)}",
    ]
    for name, address in (proxy_plugins or {}).items():
        lines += [f"[proxy_plugins.{_toml_str(name)}]", '  type = "snapshot"',
                  f"  address = {_toml_str(address)}"]
    return "\n".join(lines) + "\n" + runtimes_toml + ("\n" if runtimes_toml else "")


def snippet_handler(snippet: Path, name: str) -> str:
    """Runtime handler ``name`` of a containerd config snippet (configs/containerd/*.toml),
    as its text stands there (its table and options table, up to the next blank line): what a
    node operator merges, not a copy of it."""
    text = snippet.read_text()
    runtimes = tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"][
        "runtimes"]
    if name not in runtimes:
        raise KeyError(f"{snippet}: no runtime handler {name!r}")
    start = text.index(f"runtimes.{name}]")
    block = text[text.rindex("\n", 0, start) + 1:]
    end = block.find("\n\n")
    return block if end < 0 else block[:end + 1]


class CriNode:
    """containerd + CRI on private dirs under ``workdir``; see the module docstring.

    ``registry`` is the address (``host:port``) of a plain-HTTP registry, or several;
    ``sandbox_image`` a ref in one of them. ``env`` and ``bin_dirs`` go to
    :class:`Containerd` (they reach every shim). ``deadline``/``pull_deadline`` are the
    :class:`CriClient`'s defaults. Use as a context manager or call :meth:`start` and,
    always, :meth:`teardown`.
    """

    def __init__(self, workdir: Path, *, registry: str | Sequence[str], sandbox_image: str,
                 snapshotter: str = "overlayfs", disable_snapshot_annotations: bool = False,
                 proxy_plugins: Mapping[str, Path] | None = None, runtimes_toml: str = "",
                 default_runtime: str = "runc", env: Mapping[str, str] | None = None,
                 bin_dirs: Sequence[str] = (), extra_config: str = "",
                 deadline: float = DEFAULT_DEADLINE,
                 pull_deadline: float = PULL_DEADLINE) -> None:
        self.workdir = workdir
        self.registries = (registry,) if isinstance(registry, str) else tuple(registry)
        self.sandbox_image = sandbox_image
        self.snapshotter = snapshotter
        self.deadline = deadline
        self.pull_deadline = pull_deadline
        workdir.mkdir(parents=True, exist_ok=True)
        self.certs_d = write_registry_hosts(workdir / "certs.d", self.registries)
        config = cri_config(workdir, sandbox_image=sandbox_image, certs_d=self.certs_d,
                            snapshotter=snapshotter,
                            disable_snapshot_annotations=disable_snapshot_annotations,
                            proxy_plugins=proxy_plugins, runtimes_toml=runtimes_toml,
                            default_runtime=default_runtime)
        self.ctd = Containerd(workdir, env=env, bin_dirs=bin_dirs,
                              extra_config=config + extra_config, cri=True)
        self.cri_root = self.ctd.root / "io.containerd.grpc.v1.cri"
        self.cri_state = self.ctd.state / "io.containerd.grpc.v1.cri"
        self._cri: CriClient | None = None
        self._host_cgroups: set[Path] | None = None

    @property
    def cri(self) -> CriClient:
        if self._cri is None:
            raise RuntimeError("CriNode is not started")
        return self._cri

    @property
    def pid(self) -> int:
        if self.ctd.proc is None:
            raise RuntimeError("containerd is not running")
        return self.ctd.proc.pid

    def running(self) -> bool:
        return self.ctd.proc is not None and self.ctd.proc.poll() is None

    def log_text(self) -> str:
        return self.ctd.log_text()

    def cost(self) -> HostCost:
        """containerd's :func:`host_cost` so far, disk counted under its root."""
        return host_cost(self.pid, self.ctd.root)

    def start(self, timeout: float = 60) -> CriNode:
        """Start containerd and wait until the CRI plugin answers Version."""
        if self._host_cgroups is None:
            self._host_cgroups = cri_cgroups()
        try:
            self.ctd.start(timeout=timeout)
            self._cri = CriClient(self.ctd.socket, deadline=self.deadline,
                                  pull_deadline=self.pull_deadline)
            self._wait_ready(timeout)
        except BaseException:
            self.teardown()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.cri.version(deadline=5)
                return
            except CriError as err:
                if not self.running():
                    raise RuntimeError("containerd exited while the CRI plugin started: "
                                       f"{self.log_text()[-3000:]}") from err
                # containerd already serves (ctr version answered), so the CRI service
                # would be registered: UNIMPLEMENTED means the plugin failed to load.
                if err.code_name == "UNIMPLEMENTED" or time.monotonic() > deadline:
                    log = self.log_text()
                    why = [line for line in log.splitlines()
                           if "io.containerd.grpc.v1.cri" in line and "level=info" not in line]
                    raise RuntimeError(f"the CRI plugin is not serving ({err}): "
                                       + " | ".join(why[-3:]) + f"\n{log[-3000:]}") from err
            time.sleep(0.05)

    def remove_all(self, deadline: float = 60) -> list[CriError]:
        """Stop and remove every container and pod sandbox through CRI; returns the errors
        (tolerated, for the caller's report)."""
        errors: list[CriError] = []
        cri = self.cri

        def attempt(call: Callable[..., object], *args: str) -> None:
            try:
                call(*args, deadline=deadline)
            except CriError as err:
                errors.append(err)

        try:
            containers = cri.list_containers(deadline=deadline)
        except CriError as err:
            errors.append(err)
            containers = []
        for c in containers:
            attempt(cri.stop_container, c.id)
            attempt(cri.remove_container, c.id)
        try:
            pods = cri.list_pod_sandboxes(deadline=deadline)
        except CriError as err:
            errors.append(err)
            pods = []
        for p in pods:
            attempt(cri.stop_pod_sandbox, p.id)
            attempt(cri.remove_pod_sandbox, p.id)
        return errors

    def teardown(self) -> None:
        """Remove every container and pod through CRI (errors tolerated), then stop
        containerd and unmount and delete its dirs. Idempotent."""
        if self._cri is not None:
            if self.running():
                with contextlib.suppress(Exception):
                    self.remove_all(deadline=30)
            self._cri.close()
            self._cri = None
        self.ctd.teardown()
        if self._host_cgroups is not None:
            # runc leaves the (empty) per-namespace parent cgroups it created; remove the
            # ones that were not there before this node started (rmdir fails if in use).
            for cg in cri_cgroups() - self._host_cgroups:
                with contextlib.suppress(OSError):
                    cg.rmdir()

    def __enter__(self) -> CriNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def cri_cgroups(root: Path = Path("/sys/fs/cgroup")) -> set[Path]:
    """The CRI namespace's parent cgroups (``/k8s.io`` of each hierarchy)."""
    return {*root.glob(CRI_NAMESPACE), *root.glob(f"*/{CRI_NAMESPACE}")}


# -- the pause image ---------------------------------------------------------------------


def build_pause_image(layout_dir: Path, ref: str = "pause") -> BuiltImage:
    """Add a pause image to the OCI layout at ``layout_dir``, tagged ``ref``: busybox-static's
    ``sh`` and ``sleep`` only, entrypoint :data:`PAUSE_ENTRYPOINT`, no Cmd."""
    layout = OciLayout(layout_dir)
    with tempfile.TemporaryDirectory(prefix=".pause-tree-", dir=layout_dir.parent) as tmp:
        tree = busybox_tree(Path(tmp) / "rootfs", applets=("sh", "sleep"))
        layer = LayerBuilder().tree(tree).build()
    config = {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
              "Entrypoint": list(PAUSE_ENTRYPOINT), "StopSignal": "SIGTERM"}
    return layout.add_image([layer], ref=ref, config_extra={"config": config})


def publish_pause_image(registry: RegistryServer, workdir: Path, *,
                        repo: str = "kata-ipu/pause", tag: str = "3.6") -> str:
    """Build the pause image under ``workdir`` and push it; returns its ref."""
    layout_dir = workdir / "pause-oci"
    build_pause_image(layout_dir, ref=tag)
    ref = f"{registry.address}/{repo}:{tag}"
    push(layout_dir, tag, ref)
    return ref


# -- host cost ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCost:
    """What a process cost the host: CPU seconds (its own and its reaped children's), the
    bytes it made the storage layer read and write (``/proc/PID/io``; writes are counted when
    pages are dirtied), and the bytes allocated under a directory. Subtract two samples to
    get the cost of what happened between them."""

    cpu_seconds: float
    read_bytes: int
    write_bytes: int
    disk_bytes: int

    def __sub__(self, other: HostCost) -> HostCost:
        return HostCost(self.cpu_seconds - other.cpu_seconds,
                        self.read_bytes - other.read_bytes,
                        self.write_bytes - other.write_bytes,
                        self.disk_bytes - other.disk_bytes)


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid``, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # fields 14-17
    return ticks / os.sysconf("SC_CLK_TCK")


def io_bytes(pid: int) -> tuple[int, int]:
    """(read_bytes, write_bytes) of ``pid`` from ``/proc/PID/io``."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = int(value)
    return values["read_bytes"], values["write_bytes"]


def disk_usage(root: Path) -> int:
    """Bytes allocated (``st_blocks * 512``) under ``root``, like ``du -sx --block-size=1``:
    symlinks not followed, other mounts not entered, hard links counted once; entries that
    vanish during the walk are skipped."""
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return 0
    total = top.st_blocks * 512
    if not stat.S_ISDIR(top.st_mode):
        return total
    seen: set[int] = set()
    stack = [os.fspath(root)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_dev != top.st_dev:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def host_cost(pid: int, root: Path) -> HostCost:
    """Sample :class:`HostCost` of process ``pid``, disk counted under ``root``."""
    read, write = io_bytes(pid)
    return HostCost(cpu_seconds(pid), read, write, disk_usage(root))
