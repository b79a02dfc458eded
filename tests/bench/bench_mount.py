"""Mounting a fresh ext4 clone as a container root: with its journal vs ``noload`` (not a test).

    .venv/bin/python -m tests.bench.bench_mount [--runs 25] [--busy 2]

Each run clones (``FICLONE``, as kata-ipud's file backend does) a freshly made ext4 image on a
private XFS pool, attaches it to a loop device with direct I/O and times ``mount(2)`` alone,
the way the shim proxy mounts a clone (:func:`shim_hooks.hostmount.mount_clone`). ``--busy N``
runs N busy processes meanwhile: a container's start has both CPUs busy with containerd and
the delegate shim. Printed side by side (never asserted).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

from kata_ipu.block import fsutil, loop
from shim_hooks import hostmount


def _busy(stop: Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


@contextlib.contextmanager
def _xfs_pool(work: Path) -> Iterator[Path]:
    image, pool = work / "pool.img", work / "pool"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    pool.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(pool)], check=True)
    try:
        yield pool
    finally:
        subprocess.run(["umount", str(pool)], check=False)


def _one(base: Path, clone: Path, target: Path, options: tuple[str, ...]) -> float:
    fsutil.reflink(base, clone)
    dev = loop.attach(clone, direct_io=True, block_size=4096)  # as kata-ipud's file backend
    try:
        t0 = time.perf_counter()
        hostmount.mount(dev.path, target, "ext4", options)
        elapsed = time.perf_counter() - t0
        hostmount.umount(target)
    finally:
        loop.detach(dev.minor, clone)
        clone.unlink()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_mount")
    p.add_argument("--runs", type=int, default=25)
    p.add_argument("--busy", type=int, default=2, help="busy processes during the mounts")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_mount: needs root (loop devices, mounts)")
        return 1
    variants = {"with its journal": (), "noload (mount_clone)": ("noload",)}
    with tempfile.TemporaryDirectory(prefix="bench-mount-") as tmp, _xfs_pool(Path(tmp)) as pool:
        base = pool / "base.img"
        with open(base, "wb") as f:
            f.truncate(256 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-J", "size=16",
                        "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d", "/etc",
                        str(base)], check=True)
        target = Path(tmp) / "mnt"
        target.mkdir()
        stop = multiprocessing.Event()
        load = [multiprocessing.Process(target=_busy, args=(stop,)) for _ in range(a.busy)]
        for proc in load:
            proc.start()
        times: dict[str, list[float]] = {name: [] for name in variants}
        try:
            for _ in range(a.runs):  # interleaved
                for name, options in variants.items():
                    time.sleep(0.02)
                    times[name].append(_one(base, pool / "clone.img", target, options))
        finally:
            stop.set()
            for proc in load:
                proc.join()
    print(f"mount(2) of a fresh ext4 clone (loop, direct I/O); {a.busy} busy processes, "
          f"{os.cpu_count()} CPUs, {a.runs} runs")
    first = statistics.median(times["with its journal"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<24} median {med * 1000:6.2f} ms  min {min(ts) * 1000:6.2f}  "
              f"max {max(ts) * 1000:6.2f}  {med / first:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
