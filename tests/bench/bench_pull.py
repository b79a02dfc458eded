"""Benchmark: kata-ipu pull vs ``skopeo copy docker://… oci:…`` from a local registry.

Run as ``.venv/bin/python -m tests.bench.bench_pull [--size-mib 200] [--runs 3]``. Builds a
~200 MiB, 3-layer gzip image (plus a second image sharing the 2 bottom layers), pushes both to a
real ``docker-registry`` on 127.0.0.1, then alternates cold pulls into empty stores:

* kata-ipu: a child ``python -m tests.bench.bench_pull --child REF STORE`` (so interpreter
  start-up is counted, as skopeo's is);
* skopeo: ``skopeo copy --src-tls-verify=false docker://REF oci:DIR:tag``.

Wall time is measured around each child; CPU time is the child's user+system from
``wait4`` rusage. Medians are printed side by side with the ratios, then the second pull of the
image sharing 2 of 3 layers, with the bytes kata-ipu actually downloaded. Not a test: no
assertions, numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout
from kata_ipu.testing.registry import RegistryServer, push


def _layer(name: str, size: int, seed: int) -> bytes:
    """A layer of ``size`` bytes: half random, half text-like (gzip ratio similar to
    real binaries), split into 4 MiB files."""
    rnd = __import__("random").Random(seed)
    b = LayerBuilder().dir(name)
    chunk = 4 << 20
    for i in range(0, size, chunk):
        n = min(chunk, size - i)
        half = n // 2
        text = (b"kata-ipu %d " % seed) * (half // 12 + 1)
        b.file(f"{name}/f{i // chunk:04d}", rnd.randbytes(half) + text[: n - half])
    return b.build()


def build(work: Path, size_mib: int) -> tuple[Path, int]:
    """Two images sharing their 2 bottom layers; returns (layout, new-layer size)."""
    total = size_mib << 20
    # Half-random content compresses ~2x, so aim for ~2x uncompressed.
    sizes = [int(total * 2 * f) for f in (0.45, 0.35, 0.20)]
    base1 = _layer("base1", sizes[0], 1)
    base2 = _layer("base2", sizes[1], 2)
    top_a = _layer("topa", sizes[2], 3)
    top_b = _layer("topb", sizes[2], 4)
    layout = OciLayout(work / "layout")
    layout.add_image([base1, base2, top_a], ref="a")
    b = layout.add_image([base1, base2, top_b], ref="b")
    return work / "layout", b.layers[2].size


def _run(argv: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[:3]} failed: {err[-2000:]}")
    return wall, rusage.ru_utime + rusage.ru_stime, out


def kata_pull(ref: str, store: Path) -> tuple[float, float, dict[str, int]]:
    wall, cpu, out = _run([sys.executable, "-m", "tests.bench.bench_pull", "--child", ref,
                           str(store)])
    return wall, cpu, json.loads(out.strip().splitlines()[-1])


def skopeo_pull(ref: str, dest: Path, tag: str) -> tuple[float, float]:
    wall, cpu, _ = _run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                         f"docker://{ref}", f"oci:{dest}:{tag}"])
    return wall, cpu


def child(ref: str, store_dir: str) -> None:
    from kata_ipu.content.store import ContentStore
    from kata_ipu.image.pull import Puller

    with ContentStore.open(store_dir) as store:
        img = asyncio.run(Puller(store).pull(ref))
    print(json.dumps({"bytes_fetched": img.bytes_fetched,
                      "layers": sum(d.size for d in img.manifest.layers)}))


def in_process(ref_a: str, ref_b: str, store_dir: Path
               ) -> tuple[tuple[float, float, int], tuple[float, float, int]]:
    """Cold pull of ``ref_a`` then ``ref_b`` in this process; (wall, CPU, bytes) each."""
    from kata_ipu.content.store import ContentStore
    from kata_ipu.image.pull import Puller

    out = []
    with ContentStore.open(store_dir) as store:
        puller = Puller(store)
        for ref in (ref_a, ref_b):
            w0, c0 = time.perf_counter(), time.process_time()
            img = asyncio.run(puller.pull(ref))
            out.append((time.perf_counter() - w0, time.process_time() - c0, img.bytes_fetched))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("REF", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="kata-ipu-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        layout, new_layer = build(work, args.size_mib)
        (work / "reg").mkdir()
        with RegistryServer(work / "reg") as reg:
            push(layout, "a", f"{reg.address}/bench/app:a")
            push(layout, "b", f"{reg.address}/bench/app:b")
            print(f"# image built and pushed in {time.perf_counter() - t0:.1f}s")
            ref_a, ref_b = f"{reg.address}/bench/app:a", f"{reg.address}/bench/app:b"
            k_wall, k_cpu, s_wall, s_cpu = [], [], [], []
            info: dict[str, int] = {}
            for i in range(args.runs):
                # Alternate the order so page-cache and CPU contention hit both alike.
                order = ("kata", "skopeo") if i % 2 == 0 else ("skopeo", "kata")
                for who in order:
                    if who == "kata":
                        w, c, info = kata_pull(ref_a, work / f"k{i}")
                        k_wall.append(w)
                        k_cpu.append(c)
                    else:
                        w, c = skopeo_pull(ref_a, work / f"s{i}", "a")
                        s_wall.append(w)
                        s_cpu.append(c)
            kw, kc = statistics.median(k_wall), statistics.median(k_cpu)
            sw, sc = statistics.median(s_wall), statistics.median(s_cpu)
            mib = info["layers"] / (1 << 20)
            print(f"\n## cold pull, {mib:.1f} MiB compressed, 3 gzip layers, "
                  f"median of {args.runs}")
            print(f"{'':24}{'kata-ipu':>12}{'skopeo':>12}{'ratio':>10}")
            print(f"{'wall time (s)':24}{kw:12.2f}{sw:12.2f}{kw / sw:10.2f}")
            print(f"{'CPU time user+sys (s)':24}{kc:12.2f}{sc:12.2f}{kc / sc:10.2f}")
            print(f"{'throughput (MiB/s)':24}{mib / kw:12.1f}{mib / sw:12.1f}")
            print(f"runs kata wall {[round(x, 2) for x in k_wall]} cpu "
                  f"{[round(x, 2) for x in k_cpu]}")
            print(f"runs skopeo wall {[round(x, 2) for x in s_wall]} cpu "
                  f"{[round(x, 2) for x in s_cpu]}")
            kw2, kc2, info2 = kata_pull(ref_b, work / "k0")
            sw2, sc2 = skopeo_pull(ref_b, work / "s0", "b")
            print("\n## second pull, image sharing 2 of 3 layers (into the first store)")
            print(f"{'':24}{'kata-ipu':>12}{'skopeo':>12}{'ratio':>10}")
            print(f"{'wall time (s)':24}{kw2:12.2f}{sw2:12.2f}{kw2 / sw2:10.2f}")
            print(f"{'CPU time user+sys (s)':24}{kc2:12.2f}{sc2:12.2f}{kc2 / sc2:10.2f}")
            print(f"kata-ipu bytes downloaded: {info2['bytes_fetched']} "
                  f"(new layer {new_layer} + config; image total {info2['layers']})")
            cold, second = in_process(ref_a, ref_b, work / "inproc")
            print("\n## kata-ipu inside a running interpreter (the daemon's case: no start-up)")
            print(f"{'':24}{'wall (s)':>12}{'CPU (s)':>12}{'bytes':>14}")
            for label, (w, c, n) in (("cold pull", cold), ("second pull", second)):
                print(f"{label:24}{w:12.2f}{c:12.2f}{n:14d}")


if __name__ == "__main__":
    main()
