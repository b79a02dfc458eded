"""The main job, end to end on one machine (README command 1: ``./scripts/demo``).

1. build a small image locally (Debian's static busybox; no internet) and push it to a
   private ``docker-registry`` on 127.0.0.1;
2. start ``kata-ipud`` (the software IPU: ``file`` backend, state in a scratch directory);
3. prepare a container rootfs **cold** (pull + unpack once + clone + export) and **warm**
   (clone + export only) with the ``kata-ipu`` CLI;
4. mount the warm clone as a container root and run a command in it with ``runc``;
5. start a private containerd and run a container with
   ``ctr run --runtime io.containerd.kata-ipu.v2`` (delegate: the runc shim; Kata is not
   installable on these machines), twice, its ``start`` forked by ``kata-ipu-shimd``:
   containerd pulls nothing, the shim asks kata-ipud for the rootfs and the container's ``/``
   is the IPU's block device;
6. release the rootfs volumes, stop everything, and print the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kata_ipu.testing.containerd import Containerd
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.registry import RegistryServer, push


def _cli(daemon: IpuDaemon, *args: str) -> tuple[float, str]:
    start = time.monotonic()
    out = daemon.cli(*args, check=False)
    elapsed = time.monotonic() - start
    if out.returncode != 0:
        raise SystemExit(f"demo: kata-ipu {' '.join(args)} failed: {out.stderr.strip()}")
    return elapsed, out.stdout


def _run_container(device: str, workdir: Path, container_id: str) -> tuple[float, str]:
    bundle = workdir / f"bundle-{container_id}"
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "ext4", device, str(rootfs)], check=True)
    try:
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = [
            "/bin/sh", "-c",
            'cat /etc/motd; while read dev mnt fs rest; do [ "$mnt" = / ] && '
            'echo "/ is $dev ($fs)"; done < /proc/mounts; true']
        spec["root"]["readonly"] = False
        (bundle / "config.json").write_text(json.dumps(spec))
        start = time.monotonic()
        out = subprocess.run(["runc", "--root", str(workdir / "runc"), "run", "--bundle",
                              str(bundle), container_id], capture_output=True, text=True,
                             check=True, timeout=60)
        return time.monotonic() - start, out.stdout
    finally:
        subprocess.run(["umount", str(rootfs)], check=False)


def _shim_server(workdir: Path) -> tuple[subprocess.Popen[bytes], Path, list[str]]:
    """kata-ipu-shimd on a private socket, and the native launcher if a C compiler is here
    (docs/adr/0004-resident-shim-server.md): the shim's start becomes a fork of a warm
    process instead of a Python start-up."""
    bindir = Path(sys.executable).parent
    sock = workdir / "shimd.sock"
    server = subprocess.Popen([str(bindir / "kata-ipu-shimd"), "--socket", str(sock)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    bin_dirs = [str(bindir)]
    build = Path(__file__).resolve().parents[1] / "scripts" / "build-launcher"
    if shutil.which("cc") and build.exists():
        native = workdir / "native" / "containerd-shim-kata-ipu-v2"
        if subprocess.run([str(build), str(native),
                           str(bindir / "containerd-shim-kata-ipu-v2")],
                          capture_output=True, check=False).returncode == 0:
            bin_dirs.insert(0, str(native.parent))
    return server, sock, bin_dirs


def _ctr_run(daemon: IpuDaemon, workdir: Path, ref: str) -> list[tuple[float, str]]:
    (workdir / "shim.toml").write_text(f'socket_dir = "{workdir}/shim-sockets"\n')
    empty = workdir / "empty-rootfs"
    empty.mkdir(exist_ok=True)
    server, sock, bin_dirs = _shim_server(workdir)
    env = {"KATA_IPU_ADDRESS": daemon.address, "KATA_IPU_DELEGATE": "runc",
           "KATA_IPU_SHIM_CONFIG": str(workdir / "shim.toml"),
           "KATA_IPU_SHIM_SERVER": str(sock)}
    runs = []
    try:
        with Containerd(workdir / "containerd", env=env, bin_dirs=bin_dirs) as ctd:
            for i in range(2):
                start = time.monotonic()
                # --rootfs of an empty dir: containerd pulls and unpacks nothing; the
                # annotation names the image the IPU prepares.
                out = ctd.ctr("run", "--rm", "--runtime", "io.containerd.kata-ipu.v2",
                              "--annotation", f"io.katacontainers.ipu.image={ref}",
                              "--rootfs", str(empty), f"demo-ctr{i}", "/bin/sh", "-c",
                              'cat /etc/motd; while read dev mnt fs rest; do [ "$mnt" = / ] '
                              '&& echo "/ is $dev ($fs)"; done < /proc/self/mounts; true')
                runs.append((time.monotonic() - start, out.stdout))
    finally:
        server.terminate()
        server.wait(30)
    return runs


def _build_and_push(workdir: Path, registry: str) -> str:
    """Build the demo image (busybox plus a motd layer) and push it; its reference."""
    layout = OciLayout(workdir / "oci")
    base = LayerBuilder().tree(busybox_tree(workdir / "tree")).build()
    app = LayerBuilder().file(
        "etc/motd", b"hello from a kata-ipu block-device rootfs\n").build()
    layout.add_image([base, app], ref="demo")
    ref = f"{registry}/demo/busybox:demo"
    push(workdir / "oci", "demo", ref)
    return ref


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kata-ipu-demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="scratch directory (default: a new temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (loop devices, mounts, runc)", file=sys.stderr)
        return 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kata-ipu-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float]] = []
    daemon: IpuDaemon | None = None
    try:
        for sub in ("registry", "ipu"):
            (workdir / sub).mkdir(exist_ok=True)
        with RegistryServer(workdir / "registry") as registry:
            print(f"1. building an image and pushing it to {registry.address}")
            ref = _build_and_push(workdir, registry.address)

            print("2. starting kata-ipud (software IPU, file backend)")
            daemon = IpuDaemon(workdir / "ipu", pool_size="4G")
            t0 = time.monotonic()
            daemon.start()
            timings.append(("kata-ipud start + recovery", time.monotonic() - t0))

            print("3. preparing container rootfs: cold, then warm")
            t_cold, out = _cli(daemon, "prepare", "--id", "demo-cold", ref, "--json")
            cold = json.loads(out)
            timings.append(("prepare cold (pull + unpack once + clone + export)", t_cold))
            t_warm, out = _cli(daemon, "prepare", "--id", "demo-warm", ref, "--json")
            warm = json.loads(out)
            timings.append(("prepare warm (clone + export)", t_warm))
            print(f"   cold: {cold['path']} serial={cold['serial']}")
            print(f"   warm: {warm['path']} serial={warm['serial']}")

            print("4. running a container on the warm clone with runc")
            t_run, output = _run_container(warm["path"], workdir, "demo-warm")
            timings.append(("runc run on the clone", t_run))
            for line in output.splitlines():
                print(f"   | {line}")

            print("5. ctr run --runtime io.containerd.kata-ipu.v2 (private containerd, "
                  "kata-ipu-shimd)")
            for i, (t_ctr, output) in enumerate(_ctr_run(daemon, workdir, ref)):
                timings.append((f"ctr run --rm --runtime io.containerd.kata-ipu.v2 #{i + 1}",
                                t_ctr))
                for line in output.splitlines():
                    print(f"   | {line}")

            print("6. releasing")
            for cid in ("demo-cold", "demo-warm"):
                t_rel, _ = _cli(daemon, "release", cid)
                timings.append((f"release {cid}", t_rel))
    finally:
        if daemon is not None:
            daemon.teardown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\ntimings (wall clock, through the CLI and the daemon's unix socket):")
    for name, seconds in timings:
        print(f"  {name:<52} {seconds * 1000:9.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
