"""kata-ipud end to end, against the seed's two flows done by hand, in one run.

    (a) host flow:       skopeo copy + umoci unpack (+ runc run)
    (b) IPU by hand:     skopeo copy + umoci unpack + dd + mkfs.ext4 + loop mount + cp -a
                         + unmount + clone (cp --reflink=auto)
    (c) kata-ipu prepare, cold (empty daemon: pull + build once + clone + export)
    (d) kata-ipu prepare, warm: through the CLI process, and as one ttrpc call on the socket

Under (c), two rows quote the daemon's own JSON log timings of that cold prepare: pull,
base (its build streams from the pull, so the two overlap), clone+export, and the build's
stages (apply, mkfs, sync, fsck, resize...).

Image: the ~200 MiB Debian-minbase-based gzip image of bench_rootfs ("small"; "large" with
--large), served by a local docker-registry. Wall and CPU seconds are printed side by side
with ratios against (a); the daemon's CPU is read from /proc.

    .venv/bin/python -m tests.bench.bench_daemon [--warm-runs 50] [--large]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kata_ipu import api
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.registry import RegistryServer, push
from kata_ipu.ttrpc import Client
from tests.bench.bench_rootfs import bench_layout

CLI = str(Path(sys.executable).with_name("kata-ipu"))
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    name: str
    wall: float
    cpu: float
    note: str = ""


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _timed(fn: object) -> tuple[float, float]:
    c0, t0 = _children_cpu(), time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - t0, _children_cpu() - c0


def host_flow(ref: str, work: Path) -> tuple[Row, Row]:
    oci, bundle = work / "a-oci", work / "a-bundle"

    def prepare() -> None:
        _run("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
             f"oci:{oci}:img")
        _run("umoci", "unpack", "--image", f"{oci}:img", str(bundle))

    wall, cpu = _timed(prepare)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/true"]
    (bundle / "config.json").write_text(json.dumps(spec))
    run_wall, run_cpu = _timed(lambda: _run("runc", "--root", str(work / "runc"), "run",
                                            "--bundle", str(bundle), "bench-a"))
    return (Row("(a) host: skopeo copy + umoci unpack", wall, cpu),
            Row("    + runc run /bin/true", wall + run_wall, cpu + run_cpu))


def ipu_by_hand(ref: str, work: Path) -> Row:
    oci, bundle = work / "b-oci", work / "b-bundle"
    img, mnt = work / "b-rootfs.img", work / "b-mnt"

    def flow() -> None:
        _run("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
             f"oci:{oci}:img")
        _run("umoci", "unpack", "--image", f"{oci}:img", str(bundle))
        used = int(subprocess.run(["du", "-sb", str(bundle / "rootfs")], capture_output=True,
                                  text=True, check=True).stdout.split()[0])
        size_mib = used * 3 // 2 // (1 << 20) + 64
        _run("dd", "if=/dev/zero", f"of={img}", "bs=1M", "count=0", f"seek={size_mib}")
        _run("mkfs.ext4", "-q", "-F", str(img))
        mnt.mkdir()
        _run("mount", "-o", "loop", str(img), str(mnt))
        try:
            _run("cp", "-a", f"{bundle}/rootfs/.", str(mnt))
        finally:
            _run("umount", str(mnt))
        _run("cp", "--reflink=auto", str(img), str(work / "b-clone.img"))

    wall, cpu = _timed(flow)
    return Row("(b) IPU by hand: ... + dd + mkfs + cp -a + clone", wall, cpu)


def kata_ipu_flows(ref: str, work: Path, warm_runs: int) -> list[Row]:
    (work / "ipu").mkdir()
    daemon = IpuDaemon(work / "ipu", pool_size="16G", metrics=False)
    daemon.start()
    rows: list[Row] = []
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        d0 = _proc_cpu(pid)
        wall, cli_cpu = _timed(lambda: _run(CLI, "--address", daemon.address, "prepare",
                                            "--id", "cold", ref))
        rows.append(Row("(c) kata-ipu prepare, cold", wall, cli_cpu + _proc_cpu(pid) - d0,
                        "daemon + CLI CPU"))
        rows.extend(_cold_breakdown(daemon))
        # warm, through the CLI process (Python start-up included)
        walls, cpu0, d0 = [], _children_cpu(), _proc_cpu(pid)
        for i in range(warm_runs):
            t0 = time.monotonic()
            _run(CLI, "--address", daemon.address, "prepare", "--id", f"cli-{i}", ref)
            walls.append(time.monotonic() - t0)
        host_cpu = (_children_cpu() - cpu0) / warm_runs
        ipu_cpu = (_proc_cpu(pid) - d0) / warm_runs
        rows.append(Row("(d) kata-ipu prepare, warm (CLI process)", statistics.median(walls),
                        host_cpu, f"p50; daemon CPU {ipu_cpu * 1000:.1f} ms/prepare"))
        rpc = asyncio.run(_rpc_warm(daemon, ref, warm_runs * 4))
        rows.append(Row("(d) kata-ipu Prepare, warm (one ttrpc call)", rpc[0], rpc[1],
                        f"p50; p99 {rpc[2] * 1000:.1f} ms; client CPU per call"))
    finally:
        daemon.teardown()
    return rows


def _cold_breakdown(daemon: IpuDaemon) -> list[Row]:
    """The daemon's own timings of the cold prepare (its JSON log lines), as note rows."""
    prepared: dict[str, object] = {}
    built: dict[str, object] = {}
    for line in daemon.log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if rec.get("container_id") != "cold":
            continue
        if rec.get("msg") == "rootfs prepared":
            prepared = rec
        elif rec.get("msg") == "base built":
            built = rec
    stages = built.get("stages") or {}
    assert isinstance(stages, dict)
    parts = ", ".join(f"{k} {float(v) * 1000:.0f}" for k, v in stages.items())
    note = (f"daemon: pull {float(str(prepared.get('pull_seconds', 0))) * 1000:.0f} ms "
            f"(the build streams from it), then base "
            f"{float(str(prepared.get('base_seconds', 0))) * 1000:.0f} ms, clone+export "
            f"{float(str(prepared.get('clone_export_seconds', 0))) * 1000:.1f} ms")
    return [Row("    cold, daemon's own breakdown", float(str(prepared.get("seconds", 0))), 0.0,
                note),
            Row("    cold, build stages (ms)", float(str(built.get("build_seconds", 0))), 0.0,
                parts)]


async def _rpc_warm(daemon: IpuDaemon, ref: str, n: int) -> tuple[float, float, float]:
    walls = []
    async with await Client.connect(daemon.address) as c:
        cpu0 = time.process_time()
        for i in range(n):
            t0 = time.monotonic()
            await c.call_message(api.ROOTFS_SERVICE, "Prepare",
                                 pb.PrepareRequest(container_id=f"rpc-{i}", image=ref),
                                 pb.PrepareResponse, timeout=60)
            walls.append(time.monotonic() - t0)
        cpu = (time.process_time() - cpu0) / n
    walls.sort()
    return statistics.median(walls), cpu, walls[len(walls) * 99 // 100]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_daemon")
    p.add_argument("--warm-runs", type=int, default=30)
    p.add_argument("--large", action="store_true", help="the ~1 GiB image instead")
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    name = "large" if args.large else "small"
    layout, _digest = bench_layout(name)
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    try:
        (work / "registry").mkdir()
        with RegistryServer(work / "registry") as reg:
            ref = f"{reg.address}/bench/{name}:1"
            push(layout, name, ref)
            a, a_run = host_flow(ref, work)
            b = ipu_by_hand(ref, work)
            rows = [a, a_run, b, *kata_ipu_flows(ref, work, args.warm_runs)]
    finally:
        subprocess.run(["umount", str(work / "b-mnt")], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"image: bench {name!r} ({layout}); {os.cpu_count()} CPUs; "
          f"warm runs: {args.warm_runs} via CLI, {args.warm_runs * 4} via ttrpc")
    print(f"{'flow':<50}{'wall ms':>10}{'CPU ms':>10}{'wall/(a)':>10}  note")
    for r in rows:
        print(f"{r.name:<50}{r.wall * 1000:>10.1f}{r.cpu * 1000:>10.2f}"
              f"{r.wall / a.wall:>9.4f}x  {r.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
