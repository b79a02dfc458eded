"""``ctr run --rm`` to the container's first output line: kata-ipu vs plain runc (not a test).

    .venv/bin/python -m tests.bench.bench_shim [--runs 5] [--payload-mib 64]

Everything is real and private: a registry on 127.0.0.1, kata-ipud with its pool, containerd
1.6 on its own socket/root/state. The image is busybox plus one layer of ``--payload-mib`` of
incompressible data. Printed side by side (never asserted):

* warm: plain ``io.containerd.runc.v2`` with the image already unpacked by containerd's
  overlayfs snapshotter, vs ``io.containerd.kata-ipu.v2`` (delegate: runc shim) with the IPU's
  base already built, vs ``kata-ipu-runtime`` as the runc shim's BinaryName;
* cold: ``io.containerd.kata-ipu.v2`` on an image neither the IPU nor containerd has seen
  (``ctr run --rootfs``: containerd pulls nothing, the IPU pulls and builds), vs ``ctr image
  pull`` + ``ctr run`` of another never-seen image of the same shape.

Goals (issue 7): warm <= 1.2x plain runc; cold <= 0.5x pull + run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kata_ipu.testing.containerd import Containerd
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.registry import RegistryServer, push

ANN = "io.katacontainers.ipu.image"


def first_line(ctd: Containerd, *args: str) -> float:
    """Seconds from spawning ``ctr`` to the container's first stdout line."""
    argv = ["ctr", "--address", str(ctd.socket), "--namespace", ctd.namespace, *args]
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


def _row(name: str, times: list[float]) -> str:
    med = statistics.median(times)
    return (f"{name:<52} {len(times):>4} {med:>8.3f} {min(times):>8.3f} {max(times):>8.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_shim")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--payload-mib", type=int, default=64)
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_shim: needs root (containerd, loop devices, mounts)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-shim-") as tmp:
        work = Path(tmp)
        for d in ("reg", "ipud", "ctd"):
            (work / d).mkdir()
        with RegistryServer(work / "reg") as reg:
            layout = OciLayout(work / "oci")
            base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
            for tag in ("warm", "cold-ipu", "cold-ctd"):
                payload = LayerBuilder().file("payload.bin",
                                              os.urandom(a.payload_mib << 20)).build()
                layout.add_image([LayerBuilder().file(f"etc/{tag}", tag.encode()).build(),
                                  base, payload], ref=tag)
                push(work / "oci", tag, f"{reg.address}/bench/img:{tag}")
            ref = {t: f"{reg.address}/bench/img:{t}" for t in ("warm", "cold-ipu", "cold-ctd")}
            ipud = IpuDaemon(work / "ipud", pool_size="4G", insecure_registries=(reg.address,))
            ipud.start()
            try:
                (work / "shim.toml").write_text(f'socket_dir = "{work}/s"\n')
                with Containerd(work / "ctd", env={
                        "KATA_IPU_ADDRESS": ipud.address, "KATA_IPU_DELEGATE": "runc",
                        "KATA_IPU_SHIM_CONFIG": str(work / "shim.toml")}) as ctd:
                    return _bench(ctd, ipud, ref, a.runs, work, a.payload_mib)
            finally:
                ipud.teardown()


def _bench(ctd: Containerd, ipud: IpuDaemon, ref: dict[str, str], runs: int, work: Path,
           payload_mib: int) -> int:
    ctd.ctr("image", "pull", "--plain-http", ref["warm"], timeout=600)
    cmd = ["/bin/sh", "-c", "echo ready"]  # absolute: --rootfs gives no image PATH
    n = iter(range(10**6))

    def run(*extra: str, image: str = ref["warm"]) -> Callable[[], float]:
        return lambda: first_line(ctd, "run", "--rm", *extra, image, f"b{next(n)}", *cmd)

    kata_ipu = run("--runtime", "io.containerd.kata-ipu.v2", "--annotation",
                   f"{ANN}={ref['warm']}")
    wrapper = run("--runtime", "io.containerd.runc.v2", "--runc-binary", "kata-ipu-runtime",
                  "--annotation", f"{ANN}={ref['warm']}")
    plain = run()
    # warm-up: the IPU builds its base, page cache and binaries are hot for everyone
    for fn in (plain, kata_ipu, wrapper):
        fn()
    results: dict[str, list[float]] = {"plain": [], "kata-ipu": [], "wrapper": []}
    for _ in range(runs):  # interleaved, so drift hits every variant alike
        results["plain"].append(plain())
        results["kata-ipu"].append(kata_ipu())
        results["wrapper"].append(wrapper())
    # cold
    empty = work / "empty-rootfs"
    empty.mkdir()
    cold_ipu = first_line(ctd, "run", "--rm", "--rootfs", "--runtime",
                          "io.containerd.kata-ipu.v2", "--annotation", f"{ANN}={ref['cold-ipu']}",
                          str(empty), "cold-ipu", *cmd)
    t0 = time.monotonic()
    ctd.ctr("image", "pull", "--plain-http", ref["cold-ctd"], timeout=600)
    pulled = time.monotonic() - t0
    cold_ctd = pulled + first_line(ctd, "run", "--rm", ref["cold-ctd"], "cold-ctd", *cmd)

    ver = subprocess.run(["containerd", "--version"], capture_output=True, text=True,
                         check=False).stdout
    print(f"ctr run --rm to the first output line; {ver.split()[2]} containerd, "
          f"image = busybox + {payload_mib} MiB payload layer, {os.cpu_count()} CPUs")
    print(f"{'scenario':<52} {'runs':>4} {'median':>8} {'min':>8} {'max':>8}  (seconds)")
    print(_row("warm: io.containerd.runc.v2 (overlayfs, unpacked)", results["plain"]))
    print(_row("warm: io.containerd.kata-ipu.v2 (base built)", results["kata-ipu"]))
    print(_row("warm: runc.v2 + kata-ipu-runtime (base built)", results["wrapper"]))
    print(_row("cold: io.containerd.kata-ipu.v2 (IPU pulls+builds)", [cold_ipu]))
    print(_row("cold: ctr image pull + ctr run (runc.v2)", [cold_ctd]))
    plain_med = statistics.median(results["plain"])
    for name in ("kata-ipu", "wrapper"):
        ratio = statistics.median(results[name]) / plain_med
        print(f"ratio warm {name} / plain runc: {ratio:.2f}x (goal <= 1.2x: "
              f"{'met' if ratio <= 1.2 else 'MISSED'})")
    ratio = cold_ipu / cold_ctd
    print(f"ratio cold kata-ipu / (pull + run): {ratio:.2f}x (goal <= 0.5x: "
          f"{'met' if ratio <= 0.5 else 'MISSED'}); pull alone took {pulled:.3f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
