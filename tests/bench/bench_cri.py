"""Kubernetes' path, through containerd 1.6's CRI plugin as kubelet drives it: PullImage of a
never-seen image and its first container, then warm container starts (not a test).

    .venv/bin/python -m tests.bench.bench_cri [--images small,large] [--warm-runs 11]
                                              [--cold-runs 1]

Side by side, on fresh nodes for every cold run (so neither containerd nor the IPU has seen
the image), everything real and private (a registry on 127.0.0.1, containerd with its CRI
plugin whose state is a tmpfs as /run/containerd is on a host):

* plain: the ``overlayfs`` snapshotter and the ``runc`` handler — containerd downloads,
  decompresses and unpacks every layer on the host;
* ipu: the ``ipu`` snapshotter (kata-ipu-snapshotter) and the shipped ``kata-ipu-runc``
  handler, started through kata-ipu-shimd from the native launcher, with kata-ipud
  (``[rootfs] warm_clones = 1``) pulling and building the image.

Per image: PullImage wall; what it cost the host — containerd's CPU and bytes written (its
/proc/PID/stat and /proc/PID/io), and what stays under containerd's root (``du``), plus the
snapshotter process and its root for ipu; the IPU's own CPU (kata-ipud, off the host on
hardware); PullImage → the container running (StartContainer returned); then warm
CreateContainer + StartContainer in the pod, interleaved, 0.5 s apart (as in bench_shim:
kata-ipu-shimd forks and warms the next spare meanwhile), median of ``--warm-runs``. The
pause image is pulled (by the first RunPodSandbox) before anything is measured.

Images: bench_rootfs's "small" (Debian minbase + python, ~73 MiB gzip, ~208 MiB of tar) and
"large" (~1 GiB). Goals (issue 14): host CPU for PullImage <= 5% of plain's, bytes written
<= 1%, PullImage -> running <= 0.5x plain's wall, warm start <= 1.2x plain runc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kata_ipu.testing.cri import ContainerSpec, PodSpec
from kata_ipu.testing.crinode import (
    CriNode,
    HostCost,
    host_cost,
    publish_pause_image,
    snippet_handler,
)
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.registry import RegistryServer, push
from kata_ipu.testing.snapshotter import SnapshotterProcess
from tests.bench.bench_rootfs import bench_layout
from tests.bench.bench_shim import native_launcher, shim_server

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICK


def _handler(name: str) -> str:
    """The shipped containerd 1.6 snippet's handler ``name``, as it is."""
    return snippet_handler(ROOT / "configs" / "containerd" / "kata-ipu-1.6.toml", name)


@dataclass
class Cold:
    pull: float
    to_running: float
    host: HostCost
    ipu_cpu: float = 0.0


@dataclass
class Result:
    cold: list[Cold] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)


@contextlib.contextmanager
def tmpfs_state(workdir: Path) -> Iterator[None]:
    """containerd's state dir on a tmpfs, as /run/containerd is on a host."""
    state = workdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", str(state)],
                   check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False, capture_output=True)


class Node:
    """One side of the comparison: a CRI node, and what else it runs (snapshotter, IPU)."""

    def __init__(self, kind: str, work: Path, reg: RegistryServer, pause: str,
                 native: Path) -> None:
        self.kind = kind
        self.work = work
        self.handler = "" if kind == "plain" else "kata-ipu-runc"
        self.ipud: IpuDaemon | None = None
        self.sn: SnapshotterProcess | None = None
        self._stack = contextlib.ExitStack()
        if kind == "plain":
            self.node = CriNode(work / "node", registry=reg.address, sandbox_image=pause)
            return
        self.ipud = IpuDaemon(work / "ipud", pool_size="16G", metrics=False,
                              insecure_registries=(reg.address,),
                              extra_config="[rootfs]\nwarm_clones = 1\n")
        self.sn = SnapshotterProcess(work / "sn", ipu_address=self.ipud.address,
                                     lower_linger=300)  # the shipped default
        (work / "shim.toml").write_text(f'socket_dir = "{work}/s"\n'
                                        f'snapshotter_root = "{self.sn.root}"\n')
        self.env = {"KATA_IPU_ADDRESS": self.ipud.address,
                    "KATA_IPU_SHIM_CONFIG": str(work / "shim.toml")}
        self.native = native
        self.node = CriNode(work / "node", registry=reg.address, sandbox_image=pause,
                            snapshotter="ipu", proxy_plugins={"ipu": self.sn.socket},
                            runtimes_toml=_handler("kata-ipu-runc"),
                            bin_dirs=[str(native), str(BIN)], env=self.env)

    def __enter__(self) -> Node:
        try:
            if self.ipud is not None and self.sn is not None:
                self.ipud.start()
                self._stack.callback(self.ipud.teardown)
                self.sn.start()
                self._stack.callback(self.sn.teardown)
                sock = self._stack.enter_context(shim_server(self.work, self.env))
                self.node.ctd.env["KATA_IPU_SHIM_SERVER"] = str(sock)
            self._stack.enter_context(tmpfs_state(self.node.workdir))
            self.node.start()
            self._stack.callback(self.node.teardown)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def cost(self) -> HostCost:
        cost = self.node.cost()
        if self.sn is not None:
            cost = _plus(cost, host_cost(self.sn.pid, self.sn.root))
        return cost

    def ipu_cpu(self) -> float:
        assert self.ipud is not None and self.ipud.proc is not None
        return _proc_cpu(self.ipud.proc.pid)


def _plus(a: HostCost, b: HostCost) -> HostCost:
    return HostCost(a.cpu_seconds + b.cpu_seconds, a.read_bytes + b.read_bytes,
                    a.write_bytes + b.write_bytes, a.disk_bytes + b.disk_bytes)


def cold_run(node: Node, ref: str) -> tuple[Cold, str, PodSpec]:
    cri = node.node.cri
    pod = PodSpec(name=f"bench-{node.kind}", namespace="bench",
                  log_directory=str(node.work / "logs"))
    pod_id = cri.run_pod_sandbox(pod, runtime_handler=node.handler)  # pulls the pause image
    time.sleep(1.0)  # let the pod's start settle
    before, ipu0 = node.cost(), node.ipu_cpu() if node.ipud else 0.0
    t0 = time.monotonic()
    cri.pull_image(ref)
    pulled = time.monotonic()
    cost = node.cost() - before
    ipu = (node.ipu_cpu() - ipu0) if node.ipud else 0.0
    cid = cri.create_container(pod_id, pod, ContainerSpec(
        "first", ref, command=["sleep", "3600"], log_path="first.log"))
    cri.start_container(cid)
    running = time.monotonic()
    return Cold(pulled - t0, running - t0, cost, ipu), pod_id, pod


SETTLE = 0.5  # seconds between warm starts, as in bench_shim (kata-ipu-shimd refills its spare)


def warm_start(node: Node, pod_id: str, pod: PodSpec, ref: str, i: int) -> float:
    cri = node.node.cri
    time.sleep(SETTLE)
    t0 = time.monotonic()
    cid = cri.create_container(pod_id, pod, ContainerSpec(
        f"warm{i}", ref, command=["sleep", "3600"], log_path=f"warm{i}.log"))
    cri.start_container(cid)
    elapsed = time.monotonic() - t0
    cri.stop_container(cid)
    cri.remove_container(cid)
    return elapsed


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def report(name: str, info: str, plain: Result, ipu: Result) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    p_cold, i_cold = plain.cold, ipu.cold
    rows = [
        ("PullImage wall (s)", med([c.pull for c in p_cold]), med([c.pull for c in i_cold]),
         "{:.2f}"),
        ("  host CPU: containerd (+ snapshotter) (s)", med([c.host.cpu_seconds for c in p_cold]),
         med([c.host.cpu_seconds for c in i_cold]), "{:.2f}"),
        ("  host bytes written (MB)", med([c.host.write_bytes / 1e6 for c in p_cold]),
         med([c.host.write_bytes / 1e6 for c in i_cold]), "{:.2f}"),
        ("  host disk kept under the roots (MB)", med([c.host.disk_bytes / 1e6 for c in p_cold]),
         med([c.host.disk_bytes / 1e6 for c in i_cold]), "{:.2f}"),
        ("  IPU CPU: kata-ipud (s)", 0.0, med([c.ipu_cpu for c in i_cold]), "{:.2f}"),
        ("PullImage -> container running (s)", med([c.to_running for c in p_cold]),
         med([c.to_running for c in i_cold]), "{:.2f}"),
        (f"warm CreateContainer+StartContainer, median of {len(plain.warm)} (s)",
         med(plain.warm), med(ipu.warm), "{:.3f}"),
    ]
    print(f"\nimage {name}: {info}; cold runs {len(p_cold)}, each on fresh nodes")
    print(f"{'':<58} {'plain overlayfs+runc':>22} {'ipu+kata-ipu-runc':>20} {'ratio':>8}")
    for label, a, b, fmt in rows:
        ratio = f"{b / a:>7.3f}x" if a else f"{'':>8}"
        print(f"{label:<58} {fmt.format(a):>22} {fmt.format(b):>20} {ratio}")
    cpu = med([c.host.cpu_seconds for c in i_cold]) / med([c.host.cpu_seconds for c in p_cold])
    wrote = med([c.host.write_bytes for c in i_cold]) / med([c.host.write_bytes for c in p_cold])
    wall = med([c.to_running for c in i_cold]) / med([c.to_running for c in p_cold])
    warm = med(ipu.warm) / med(plain.warm)
    print(f"goals: host CPU {cpu:.1%} of plain (<= 5%), bytes written {wrote:.2%} (<= 1%), "
          f"PullImage->running {wall:.2f}x (<= 0.5x), warm {warm:.2f}x (<= 1.2x)")
    print("raw: " + json.dumps({"plain": [c.__dict__ | {"host": c.host.__dict__}
                                          for c in p_cold],
                                "ipu": [c.__dict__ | {"host": c.host.__dict__} for c in i_cold],
                                "warm_plain": plain.warm, "warm_ipu": ipu.warm},
                               default=str))


def bench_image(name: str, work: Path, reg: RegistryServer, pause: str, native: Path,
                warm_runs: int, cold_runs: int) -> None:
    layout, digest = bench_layout(name)
    manifest = json.loads((layout / "blobs" / "sha256" / digest[7:]).read_text())
    compressed = sum(layer["size"] for layer in manifest["layers"])
    results = {"plain": Result(), "ipu": Result()}
    for run in range(cold_runs):
        tag = f"{name}-{run}"
        push(layout, name, f"{reg.address}/bench/cri:{tag}")
        ref = f"{reg.address}/bench/cri:{tag}"
        order = ("plain", "ipu") if run % 2 == 0 else ("ipu", "plain")
        nodes: dict[str, tuple[Node, str, PodSpec]] = {}
        with contextlib.ExitStack() as stack:
            for kind in order:
                node = stack.enter_context(Node(kind, work / f"{name}{run}-{kind}", reg,
                                                pause, native))
                cold, pod_id, pod = cold_run(node, ref)
                results[kind].cold.append(cold)
                nodes[kind] = (node, pod_id, pod)
            if run == cold_runs - 1:
                for i in range(warm_runs):  # interleaved, the order alternating
                    for kind in (order if i % 2 == 0 else order[::-1]):
                        node, pod_id, pod = nodes[kind]
                        results[kind].warm.append(warm_start(node, pod_id, pod, ref, i))
    report(name, f"{compressed / (1 << 20):.0f} MiB compressed, {len(manifest['layers'])} "
           "layers", results["plain"], results["ipu"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_cri")
    p.add_argument("--images", default="small")
    p.add_argument("--warm-runs", type=int, default=11)
    p.add_argument("--cold-runs", type=int, default=1)
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_cri: needs root (containerd, loop devices, mounts)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-cri-") as tmp:
        work = Path(tmp)
        (work / "reg").mkdir()
        native = native_launcher(work / "native")
        with RegistryServer(work / "reg") as reg:
            pause = publish_pause_image(reg, work)
            for name in a.images.split(","):
                bench_image(name, work, reg, pause, native, a.warm_runs, a.cold_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
