"""Cold rootfs build vs ``umoci unpack``, one run printing both (not a test module).

    .venv/bin/python -m tests.bench.bench_rootfs [--images small,large] [--no-extra]

Images (gzip, cached as OCI layouts under /var/cache/kata-ipu-tests, built on first use):
  small  ~0.2 GiB: Debian bookworm minbase (debootstrap) + python3.11 from the host's /usr
  large  ~1.05 GiB: minbase + go-1.19 and gcc + headers, locales, docs, python (host /usr)

"Warm content store": every blob is read once before timing, so all tools read from the page
cache. For each image the script prints wall and CPU seconds (self + children) of umoci unpack
and of kata-ipu's builder (ext4 via loop-mount apply, the default; with the extras, the
stage + ``mkfs.ext4 -d`` strategy and erofs), the ratios against umoci, and MiB/s of
uncompressed output next to the single-core zlib inflate rate of the same blobs (the floor).
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kata_ipu.rootfs.builder import BuildConfig, RootfsBuilder
from kata_ipu.rootfs.oci import OciLayoutSource
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout
from tests.support.cache import cache_dir, locked
from tests.support.images import debian_minbase_tree

MiB = 1 << 20

IMAGE_TREES: dict[str, list[list[str]]] = {
    # Each inner list is one layer made of host /usr subtrees (after the minbase layer).
    "small": [["/usr/lib/python3.11", "/usr/lib/python3"]],
    "large": [["/usr/lib/go-1.19", "/usr/lib/gcc"],
              ["/usr/include", "/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/locale",
               "/usr/share/doc"]],
}


def bench_layout(name: str) -> tuple[Path, str]:
    # The cache key includes the layer recipe, so editing IMAGE_TREES rebuilds the image.
    recipe = hashlib.sha256(json.dumps(IMAGE_TREES[name]).encode()).hexdigest()[:12]
    final = cache_dir() / f"bench-{name}-{recipe}-gzip"
    stamp = final / ".kata-ipu-complete"
    if stamp.exists():
        return final, stamp.read_text().strip()
    with locked(cache_dir() / f".bench-{name}.lock"):
        if not stamp.exists():
            print(f"[building cached bench image {name!r}: once, takes a while]", flush=True)
            layers = [LayerBuilder().tree(debian_minbase_tree()).build()]
            for subtrees in IMAGE_TREES[name]:
                lb = LayerBuilder()
                for sub in subtrees:
                    if Path(sub).is_dir():
                        lb.tree(sub, arcroot=sub.lstrip("/"))
                layers.append(lb.build())
            if final.exists():
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=".bench-", dir=cache_dir()))
            img = OciLayout(tmp).add_image(layers, ref=name, compression="gzip")
            (tmp / ".kata-ipu-complete").write_text(img.manifest.digest + "\n")
            tmp.rename(final)
    return final, stamp.read_text().strip()


@dataclass
class Run:
    label: str
    wall: float
    cpu: float


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measure(label: str, fn: Callable[[], object]) -> Run:
    c0, t0 = _cpu(), time.monotonic()
    fn()
    return Run(label, time.monotonic() - t0, _cpu() - c0)


def inflate_floor(layout: Path, digest: str) -> tuple[float, int, float]:
    """Single-core zlib inflate of every layer blob: (seconds, output bytes, cpu seconds)."""
    src = OciLayoutSource(layout)
    manifest = src.manifest(digest)
    total = 0
    c0, t0 = _cpu(), time.monotonic()
    for layer in manifest.layers:
        d = zlib.decompressobj(wbits=31)
        with src.open_blob(layer.digest) as f:
            while chunk := f.read(MiB):
                total += len(d.decompress(chunk))
    return time.monotonic() - t0, total, _cpu() - c0


def warm(layout: Path) -> int:
    n = 0
    for p in (layout / "blobs" / "sha256").iterdir():
        with open(p, "rb") as f:
            while chunk := f.read(8 * MiB):
                n += len(chunk)
    return n


def run_image(name: str, extra: bool, scratch: Path) -> None:
    layout, digest = bench_layout(name)
    compressed = warm(layout)
    floor_s, out_bytes, _ = inflate_floor(layout, digest)
    out_mib = out_bytes / MiB
    runs: list[Run] = []

    def umoci() -> None:
        bundle = scratch / "bundle"
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{name}", str(bundle)],
                       check=True, capture_output=True)

    runs.append(measure("umoci unpack (rootfs dir)", umoci))
    shutil.rmtree(scratch / "bundle")

    configs = [("kata-ipu ext4 (loop-mount apply) [default]", BuildConfig(ext4_strategy="loop"))]
    if extra:
        configs += [("kata-ipu ext4 (stage + mkfs.ext4 -d)", BuildConfig(ext4_strategy="stage")),
                    ("kata-ipu erofs (stage + mkfs.erofs)", BuildConfig(fs_type="erofs"))]
    for label, cfg in configs:
        out = scratch / f"image.{cfg.fs_type}"
        result: dict[str, object] = {}

        def build(cfg: BuildConfig = cfg, out: Path = out,
                  result: dict[str, object] = result) -> None:
            result.update(RootfsBuilder(OciLayoutSource(layout), cfg).build(digest, out).record)

        runs.append(measure(label, build))
        print(f"    {label}: image {int(result['size_bytes']) / MiB:.0f} MiB "  # type: ignore[call-overload]
              f"({result['strategy']})", flush=True)
        out.unlink()
        Path(str(out) + ".build.json").unlink()

    base = runs[0]
    print(f"\n== image {name!r}: {compressed / MiB:.0f} MiB gzip -> {out_mib:.0f} MiB tar, "
          f"{len(OciLayoutSource(layout).manifest(digest).layers)} layers")
    print(f"   floor: single-core zlib inflate {floor_s:.2f}s = {out_mib / floor_s:.0f} MiB/s")
    print(f"   {'tool':<44} {'wall s':>7} {'cpu s':>7} {'wall/umoci':>10} {'cpu/umoci':>9} "
          f"{'MiB/s':>6} {'%floor':>6}")
    for r in runs:
        rate = out_mib / r.wall
        print(f"   {r.label:<44} {r.wall:7.2f} {r.cpu:7.2f} {r.wall / base.wall:10.2f} "
              f"{r.cpu / base.cpu:9.2f} {rate:6.0f} {100 * rate / (out_mib / floor_s):5.0f}%")
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="small,large")
    ap.add_argument("--no-extra", action="store_true",
                    help="only the default ext4 strategy (skip loop-mount and erofs)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (umoci with owners, mkfs, loop mounts)")
    umoci = subprocess.run(["umoci", "--version"], capture_output=True, text=True, check=True)
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}; "
          f"{umoci.stdout.strip()}")
    scratch_parent = Path(os.environ.get("KATA_IPU_BENCH_DIR", "/var/tmp"))
    for name in args.images.split(","):
        with tempfile.TemporaryDirectory(prefix="kata-ipu-bench-", dir=scratch_parent) as d:
            run_image(name, not args.no_extra, Path(d))


if __name__ == "__main__":
    main()
