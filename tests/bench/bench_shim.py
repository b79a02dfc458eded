"""``ctr run --rm`` to the container's first output line: kata-ipu vs plain runc (not a test).

    .venv/bin/python -m tests.bench.bench_shim [--runs 7] [--payload-mib 64]

Everything is real and private: a registry on 127.0.0.1, kata-ipud with its pool, containerd
1.6 instances on their own sockets/roots, with their state directories on a tmpfs as
containerd's ``/run/containerd`` is on a host, and kata-ipu-shimd on a private socket. The image
is busybox plus one layer of ``--payload-mib`` of incompressible data. Printed side by side,
runs interleaved (never asserted):

* warm, plain ``io.containerd.runc.v2`` with the image already unpacked by containerd's
  overlayfs snapshotter — the baseline;
* warm ``io.containerd.kata-ipu.v2`` (delegate: runc shim, IPU base already built, kata-ipud
  with ``[rootfs] warm_clones = 1``), started three ways: in-process (no server: the Python
  shim as before kata-ipu-shimd), through the server from the Python launcher, through the
  server from the native launcher;
* the proxy alone: the native launcher and server, no image annotation and ``fallback =
  "passthrough"`` (the snapshotter's rootfs, no IPU) — what the proxy costs by itself;
* ``kata-ipu-runtime`` as the runc shim's BinaryName;
* cold: ``io.containerd.kata-ipu.v2`` (server, native launcher) on an image neither the IPU
  nor containerd has seen (``ctr run --rootfs``: containerd pulls nothing, the IPU pulls and
  builds), vs ``ctr image pull`` + ``ctr run`` of another never-seen image of the same shape.

Goals (issue 7): warm <= 1.2x plain runc; cold <= 0.5x pull + run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kata_ipu.testing.containerd import Containerd
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.registry import RegistryServer, push
from kata_ipu.testing.shimd import ShimServer

ANN = "io.katacontainers.ipu.image"
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CMD = ["/bin/sh", "-c", "echo ready"]  # absolute: --rootfs gives no image PATH
SETTLE = 0.5  # seconds between runs


STARTED: dict[str, float] = {}  # container id -> wall clock when its ctr was spawned
SIGNAL_LOOP = re.compile(r'^time="([^"]+)".*msg="starting signal loop".* path=\S+/([^/ ]+) ')


def first_line(ctd: Containerd, *args: str) -> float:
    """Seconds from spawning ``ctr`` to the container's first stdout line."""
    argv = ["ctr", "--address", str(ctd.socket), "--namespace", ctd.namespace, *args]
    STARTED[args[-4]] = time.time()  # ... IMAGE ID /bin/sh -c CMD
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ctd.process_env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - t0
    _out, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or line.strip() != b"ready":
        raise RuntimeError(f"{args}: exit {proc.returncode}: {line!r} {err.decode()}")
    return elapsed


MARK_ENV = "KATA_IPU_BENCH_MARK"  # a tracefs trace_marker to name each measured run in


def _mark(variant: str) -> None:
    """Name the next measured run in the kernel's trace (tests/bench/trace_start.py)."""
    if path := os.environ.get(MARK_ENV):
        with open(path, "w", encoding="utf-8") as marker:
            marker.write(f"kipu-bench {variant}")


def shim_daemon_started(ctds: list[Containerd]) -> dict[str, float]:
    """Container id -> seconds from its ``ctr`` to the runc shim daemon's first log line
    ("starting signal loop"): containerd's own clock for when the delegate was up."""
    out = {}
    for ctd in ctds:
        for line in ctd.log_text().splitlines():
            m = SIGNAL_LOOP.match(line)
            if m and m.group(2) in STARTED:
                when = datetime.datetime.fromisoformat(m.group(1)[:26].rstrip("Z") + "+00:00")
                out[m.group(2)] = when.timestamp() - STARTED[m.group(2)]
    return out


def _row(name: str, times: list[float], base: float | None = None) -> str:
    med = statistics.median(times)
    ratio = f"{med / base:>7.2f}x" if base else f"{'':>8}"
    return (f"{name:<58} {len(times):>4} {med:>8.3f} {min(times):>8.3f} {max(times):>8.3f}"
            f" {ratio}")


@contextlib.contextmanager
def containerd(work: Path, name: str, env: dict[str, str],
               bin_dirs: list[str]) -> Iterator[Containerd]:
    """A containerd whose state directory is a tmpfs (as /run/containerd is on a host)."""
    state = work / name / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", str(state)],
                   check=True)
    try:
        with Containerd(work / name, env=env, bin_dirs=bin_dirs) as ctd:
            yield ctd
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False, capture_output=True)


def native_launcher(directory: Path) -> Path:
    """``directory``, holding the native launcher as ``containerd-shim-kata-ipu-v2``
    (scripts/build-launcher), to put first on containerd's PATH."""
    subprocess.run([str(ROOT / "scripts" / "build-launcher"),
                    str(directory / "containerd-shim-kata-ipu-v2"),
                    str(BIN / "containerd-shim-kata-ipu-v2")], check=True, capture_output=True)
    return directory


@contextlib.contextmanager
def shim_server(work: Path, env: dict[str, str]) -> Iterator[Path]:
    """kata-ipu-shimd with the shims' configuration (``env``), as on a host where both read
    /etc/kata-ipu/shim.toml."""
    with ShimServer(work, env, log_level="info") as server:
        yield server.socket


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_shim")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--payload-mib", type=int, default=64)
    p.add_argument("--cold-runs", type=int, default=3,
                   help="cold runs of each kind, each on an image nobody has seen")
    p.add_argument("--quick", action="store_true",
                   help="only plain runc, kata-ipu (native + server) and the proxy alone; "
                   "no cold runs")
    p.add_argument("--keep-logs", type=Path, default=None,
                   help="copy each containerd's log (with the shims' JSON lines) here")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_shim: needs root (containerd, loop devices, mounts)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-shim-") as tmp:
        work = Path(tmp)
        for d in ("reg", "ipud"):
            (work / d).mkdir()
        native = native_launcher(work / "native")
        with RegistryServer(work / "reg") as reg:
            layout = OciLayout(work / "oci")
            base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
            tags = ["warm"] + [f"cold-{who}{i}" for i in range(0 if a.quick else a.cold_runs)
                               for who in ("ipu", "ctd")]
            for tag in tags:
                payload = LayerBuilder().file("payload.bin",
                                              os.urandom(a.payload_mib << 20)).build()
                layout.add_image([LayerBuilder().file(f"etc/{tag}", tag.encode()).build(),
                                  base, payload], ref=tag)
                push(work / "oci", tag, f"{reg.address}/bench/img:{tag}")
            ref = {t: f"{reg.address}/bench/img:{t}" for t in tags}
            # one exported spare clone per image in use (kata_ipu.daemon.warmpool)
            ipud = IpuDaemon(work / "ipud", pool_size="4G", insecure_registries=(reg.address,),
                             extra_config="[rootfs]\nwarm_clones = 1\n")
            ipud.start()
            try:
                (work / "shim.toml").write_text(f'socket_dir = "{work}/s"\n'
                                                'fallback = "passthrough"\n')
                env = {"KATA_IPU_ADDRESS": ipud.address, "KATA_IPU_DELEGATE": "runc",
                       "KATA_IPU_SHIM_CONFIG": str(work / "shim.toml")}
                with shim_server(work, env) as sock, \
                        containerd(work, "inproc", {**env, "KATA_IPU_SHIM_SERVER": ""},
                                   [str(BIN)]) as inproc, \
                        containerd(work, "pylaunch", {**env, "KATA_IPU_SHIM_SERVER": str(sock)},
                                   [str(BIN)]) as pylaunch, \
                        containerd(work, "native", {**env, "KATA_IPU_SHIM_SERVER": str(sock)},
                                   [str(native), str(BIN)]) as fast:
                    rc = _bench(fast, pylaunch, inproc, ref, a.runs, work, a.payload_mib,
                                a.quick, a.keep_logs)
                if a.keep_logs is not None:
                    (a.keep_logs / "ipud.log").write_bytes(ipud.log.read_bytes())
                    (a.keep_logs / "shimd.log").write_bytes((work / "shimd.log").read_bytes())
                return rc
            finally:
                ipud.teardown()


def _bench(fast: Containerd, pylaunch: Containerd, inproc: Containerd, ref: dict[str, str],
           runs: int, work: Path, payload_mib: int, quick: bool = False,
           keep_logs: Path | None = None) -> int:
    for ctd in (fast, pylaunch, inproc):
        ctd.ctr("image", "pull", "--plain-http", ref["warm"], timeout=600)
    n = iter(range(10**6))

    ids: dict[Callable[[], float], list[str]] = {}

    def run(ctd: Containerd, *extra: str) -> Callable[[], float]:
        def once() -> float:
            cid = f"b{next(n)}"
            ids.setdefault(once, []).append(cid)
            return first_line(ctd, "run", "--rm", *extra, ref["warm"], cid, *CMD)
        return once

    ipu = ("--runtime", "io.containerd.kata-ipu.v2", "--annotation", f"{ANN}={ref['warm']}")
    variants: dict[str, Callable[[], float]] = {
        "warm: io.containerd.runc.v2 (overlayfs, unpacked)": run(fast),
        "warm: kata-ipu.v2, native launcher + kata-ipu-shimd": run(fast, *ipu),
        "warm: kata-ipu.v2, Python launcher + kata-ipu-shimd": run(pylaunch, *ipu),
        "warm: kata-ipu.v2, in-process start (no server)": run(inproc, *ipu),
        "warm: kata-ipu.v2 proxy only (passthrough, no IPU)": run(
            fast, "--runtime", "io.containerd.kata-ipu.v2"),
        "warm: runc.v2 + kata-ipu-runtime (base built)": run(
            inproc, "--runtime", "io.containerd.runc.v2", "--runc-binary", "kata-ipu-runtime",
            "--annotation", f"{ANN}={ref['warm']}"),
    }
    if quick:
        variants = {k: v for k, v in variants.items()
                    if "native" in k or "runc.v2 (" in k or "proxy only" in k}
    results = _measure(variants, runs)
    cold: list[tuple[float, float, float]] = []
    if not quick:
        empty = work / "empty-rootfs"
        empty.mkdir()
        cold = [_cold(fast, ref, empty, i) for i in range(sum(t.startswith("cold-ipu")
                                                                for t in ref))]
    ver = subprocess.run(["containerd", "--version"], capture_output=True, text=True,
                         check=False).stdout
    print(f"ctr run --rm to the first output line; {ver.split()[2]} containerd, "
          f"image = busybox + {payload_mib} MiB payload layer, {os.cpu_count()} CPUs")
    print(f"{'scenario':<58} {'runs':>4} {'median':>8} {'min':>8} {'max':>8} {'ratio':>8}"
          "  (seconds; ratio of medians to plain runc)")
    names = list(variants)
    plain = statistics.median(results[names[0]])
    for name in names:
        print(_row(name, results[name], plain if name != names[0] else None))
    if not quick:
        print(_row("cold: kata-ipu.v2 (IPU pulls+builds; native + server)",
                   [c[0] for c in cold]))
        print(_row("cold: ctr image pull + ctr run (runc.v2)", [c[1] for c in cold]))
    _print_breakdown(shim_daemon_started([fast, pylaunch, inproc]), variants, ids, results,
                     runs)
    ratio = statistics.median(results[names[1]]) / plain
    # each round ran every variant once, back to back: the ratio within a round cancels the
    # machine's drift between rounds
    paired = statistics.median(k / p for k, p in zip(results[names[1]], results[names[0]],
                                                     strict=True))
    print(f"ratio warm kata-ipu (native + server) / plain runc: {ratio:.2f}x (goal <= 1.2x: "
          f"{'met' if ratio <= 1.2 else 'MISSED'}); median of the rounds' ratios: "
          f"{paired:.2f}x")
    if cold:
        ratio = statistics.median(c[0] for c in cold) / statistics.median(c[1] for c in cold)
        print(f"ratio cold kata-ipu / (pull + run): {ratio:.2f}x (goal <= 0.5x: "
              f"{'met' if ratio <= 0.5 else 'MISSED'}); pull alone took "
              f"{statistics.median(c[2] for c in cold):.3f}s (median)")
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        for ctd in (fast, pylaunch, inproc):
            (keep_logs / f"{ctd.workdir.name}.log").write_text(ctd.log_text())
        (keep_logs / "started.json").write_text(json.dumps(STARTED))  # wall clock per ctr
    return 0


def _measure(variants: dict[str, Callable[[], float]], runs: int) -> dict[str, list[float]]:
    """Warm every variant up, then ``runs`` interleaved rounds; the times by variant."""
    # warm-up: the IPU builds its base, page cache and binaries are hot for everyone
    for fn in variants.values():
        fn()
        fn()
    results: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    shuffle = random.Random(7)  # the same orders on every invocation
    for _ in range(runs):  # interleaved, so drift hits every variant alike
        # ... and in a new order each round: a stall whose period is close to a round's
        # length locks onto a fixed rotation and lands on the same variant round after round
        # (seen: ctr -> shim exec 10-15 ms longer, CPUs idle, for one variant through a
        # whole invocation; which variant depended on the phase)
        shuffle.shuffle(order)
        for name, fn in order:
            # let the previous run's teardown (containerd runs the shim's `delete` after every
            # container; the wrapper's is a Python process) finish before the next one starts
            time.sleep(SETTLE)
            _mark(name)
            results[name].append(fn())
    return results


def _print_breakdown(up: dict[str, float], variants: dict[str, Callable[[], float]],
                     ids: dict[Callable[[], float], list[str]],
                     results: dict[str, list[float]], runs: int) -> None:
    print("breakdown (medians, ms): ctr -> runc shim daemon up (containerd's log) | the rest")
    for name in variants:
        if "kata-ipu-runtime" in name:  # no shim of its own to time
            continue
        measured = ids[variants[name]][-runs:]
        to_shim = [up[c] for c in measured if c in up]
        if to_shim:
            total = statistics.median(results[name])
            print(f"  {name:<56} {statistics.median(to_shim) * 1000:7.1f} | "
                  f"{(total - statistics.median(to_shim)) * 1000:7.1f}")


def _cold(fast: Containerd, ref: dict[str, str], empty: Path,
          i: int) -> tuple[float, float, float]:
    """Seconds of a cold kata-ipu run, of a cold pull + run, and of that pull alone (each on
    an image of the same shape nobody has pulled)."""
    time.sleep(SETTLE)
    cold_ipu = first_line(fast, "run", "--rm", "--rootfs", "--runtime",
                          "io.containerd.kata-ipu.v2", "--annotation",
                          f"{ANN}={ref[f'cold-ipu{i}']}", str(empty), f"cold-ipu{i}", *CMD)
    time.sleep(SETTLE)
    t0 = time.monotonic()
    fast.ctr("image", "pull", "--plain-http", ref[f"cold-ctd{i}"], timeout=600)
    pulled = time.monotonic() - t0
    cold_ctd = pulled + first_line(fast, "run", "--rm", ref[f"cold-ctd{i}"], f"cold-ctd{i}",
                                   *CMD)
    return cold_ipu, cold_ctd, pulled


if __name__ == "__main__":
    raise SystemExit(main())
