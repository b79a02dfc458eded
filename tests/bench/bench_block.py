"""Block target: clone + host export latency per backend, beside a naive ``cp`` of the image.

For each base (~200 MiB and >= 1 GiB ext4 images built with ``mkfs.ext4 -d`` from a tree of
random files) and each backend: ``--runs`` times clone a fresh volume and export it as a host
block device, timing the pair (p50/p99); pool bytes per fresh clone (statvfs delta for
``file``, allocated bytes of the pool's files for ``qsd``); then clone+export+destroy cycles
per second, serially and with 8 threads. ``cp --reflink=never`` of each image (page cache,
no fsync) is the naive copy to compare with.

    .venv/bin/python -m tests.bench.bench_block [--runs 200] [--cycles 300] [--big-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kata_ipu.block import BACKENDS, ExportKind, create_pool
from kata_ipu.block.engine import StoreTarget
from kata_ipu.block.fsutil import statvfs_space


def _build_image(path: Path, size_mib: int, work: Path) -> Path:
    """An ext4 image of ``size_mib`` MiB whose files fill ~70% of it."""
    tree = work / f"tree-{size_mib}"
    tree.mkdir()
    block = os.urandom(1 << 20)
    data_mib = int(size_mib * 0.7)
    for i in range(data_mib // 8):
        with open(tree / f"file{i:04d}.bin", "wb") as f:
            for j in range(8):
                f.write(block[j:] + block[:j])
    (tree / "hello.txt").write_text("hello\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(path),
                    f"{size_mib}M"], check=True)
    shutil.rmtree(tree)
    return path


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _used(t: StoreTarget) -> int:
    if t.backend == "file":
        return statvfs_space(t.pool.data_dir)[1]
    return t.usage().used


def _bench_clone_export(t: StoreTarget, base_id: str, runs: int) -> dict[str, float]:
    lat = []
    used0 = _used(t)
    for i in range(runs):
        t0 = time.perf_counter()
        vol = t.clone(base_id, f"{base_id}-c{i}")
        t.export(vol, ExportKind.HOST_BLOCK)
        lat.append(time.perf_counter() - t0)
    os.sync()
    per_clone = (_used(t) - used0) / runs
    for i in range(runs):
        t.destroy(f"{base_id}-c{i}")
    return {"p50": _pct(lat, 0.5) * 1e3, "p99": _pct(lat, 0.99) * 1e3,
            "max": max(lat) * 1e3, "mean": statistics.fmean(lat) * 1e3,
            "bytes_per_clone": per_clone}


def _cycles(t: StoreTarget, base_id: str, n: int, threads: int) -> float:
    def one(i: int) -> None:
        vid = f"cyc-{threads}-{i}"
        t.export(t.clone(base_id, vid), ExportKind.HOST_BLOCK)
        t.destroy(vid)

    t0 = time.perf_counter()
    if threads == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0)


def _cp(image: Path, work: Path, repeat: int = 3) -> float:
    times = []
    for i in range(repeat):
        dst = work / f"cp-{i}.img"
        t0 = time.perf_counter()
        subprocess.run(["cp", "--reflink=never", str(image), str(dst)], check=True)
        times.append(time.perf_counter() - t0)
        dst.unlink()
    return statistics.median(times) * 1e3


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--small-mib", type=int, default=200)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--backends", default=",".join(sorted(BACKENDS)))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_block needs root (loop devices, mounts)", file=sys.stderr)
        return 1
    print(f"# {platform.node()} {platform.release()} cpus={os.cpu_count()} "
          f"python={platform.python_version()}")
    work = Path(tempfile.mkdtemp(prefix="kbb-", dir="/var/tmp"))
    run_root = Path(tempfile.mkdtemp(prefix="kbb-", dir="/tmp"))
    try:
        images = {f"{args.small_mib}MiB": _build_image(work / "small.ext4", args.small_mib,
                                                       work),
                  f"{args.big_mib}MiB": _build_image(work / "big.ext4", args.big_mib, work)}
        print("\n| image | naive `cp --reflink=never` (median of 3) |")
        print("|---|---|")
        for name, image in images.items():
            print(f"| {name} | {_cp(image, work):.1f} ms |", flush=True)
        print(f"\nclone + host export, {args.runs} runs each")
        print("\n| backend | image | p50 ms | p99 ms | max ms | mean ms | pool bytes/clone |")
        print("|---|---|---|---|---|---|---|")
        cycles: dict[str, tuple[float, float]] = {}
        for backend in args.backends.split(","):
            t = create_pool(work / f"pool-{backend}", backend=backend, size=8 << 30,
                            run_dir=run_root / backend)
            try:
                for name, image in images.items():
                    t.import_base(image, name)
                    r = _bench_clone_export(t, name, args.runs)
                    print(f"| {backend} | {name} | {r['p50']:.2f} | {r['p99']:.2f} | "
                          f"{r['max']:.2f} | {r['mean']:.2f} | "
                          f"{r['bytes_per_clone'] / 1024:.1f} KiB |", flush=True)
                big = f"{args.big_mib}MiB"
                cycles[backend] = (_cycles(t, big, args.cycles, 1),
                                   _cycles(t, big, args.cycles, 8))
            finally:
                t.destroy_pool(force=True)
        print(f"\nclone + host export + destroy cycles/s ({args.cycles} cycles, "
              f"{args.big_mib} MiB base)")
        print("\n| backend | serial | 8 threads |")
        print("|---|---|---|")
        for backend, (serial, par) in cycles.items():
            print(f"| {backend} | {serial:.0f}/s | {par:.0f}/s |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
