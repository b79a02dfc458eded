"""VM path: hot-plug → container output latency, virtio-blk vs vhost-user-blk, under TCG.

One guest boot (:class:`tests.support.vmdriver.KataVM`), real kata-ipud and registry. For
each export kind, ``--runs`` times (not timed: Prepare, removal and Release):

* ``hotplug``   QMP ``blockdev-add``/``chardev-add`` + ``device_add`` + ``query-pci``
* ``create``    ``CreateContainer`` round trip: uevent wait + fsck + mount + ``runc create``;
  the agent's own stage times (guest clock) are reported as ``g-wait`` (uevent wait for the
  disk), ``g-fsck`` (``e2fsck -p``), ``g-mount`` (mount(2)), ``g-runc`` (``runc create``)
* ``to-mounted`` hotplug + g-wait + g-fsck + g-mount: hot-plug to "rootfs mounted in the guest"
* ``to-output`` hotplug + create + ``StartContainer`` + ``WaitProcess`` + ``ReadStdout``

Then the same for a second image carrying ``--big-mib`` MiB of random files (virtio-blk), to
show the block path does not grow with the image.

The virtio-fs-less alternative is copying the unpacked rootfs into the guest: a tar of each
image's tree sent with Kata's ``CopyFile`` over the same virtio-serial ttrpc channel (4 MiB
messages are the ttrpc limit, so 1 MiB chunks), untar not included (a lower bound).

    .venv/bin/python -m tests.bench.bench_vm [--runs 10] [--big-mib 64]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.registry import RegistryServer, push
from tests.support import agentproto as ap
from tests.support.vmdriver import KataVM, Shim

CHUNK = 1 << 20


def _copy_in(vm: KataVM, data: bytes, path: str) -> float:
    started = time.monotonic()
    for off in range(0, len(data), CHUNK):
        vm.agent_call("CopyFile", ap.CopyFileRequest(path, len(data), off,
                                                     data[off:off + CHUNK]).encode())
    return time.monotonic() - started


def _row(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (f"  {name:<11} p50 {statistics.median(ms):8.1f} ms   min {ms[0]:8.1f}   "
            f"max {ms[-1]:8.1f}   (n={len(ms)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_vm")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--big-mib", type=int, default=64,
                        help="size of the random data in the second, larger image")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-vm-") as tmp:
        work = Path(tmp)
        with RegistryServer(work / "reg") as reg:
            tree = busybox_tree(work / "tree")
            layout = OciLayout(work / "oci")
            layout.add_image([LayerBuilder().tree(tree).build()], ref="v1")
            image = f"{reg.address}/bench/busybox:v1"
            push(work / "oci", "v1", image)
            big_tree = busybox_tree(work / "big")
            (big_tree / "data").mkdir()
            for i in range(args.big_mib):
                (big_tree / "data" / f"blob{i:03d}").write_bytes(os.urandom(1 << 20))
            layout.add_image([LayerBuilder().tree(big_tree).build()], ref="big")
            big_image = f"{reg.address}/bench/busybox:big"
            push(work / "oci", "big", big_image)
            (work / "ipud").mkdir()
            daemon = IpuDaemon(work / "ipud", pool_size="2G")
            daemon.start()
            try:
                started = time.monotonic()
                with KataVM(work / "qemu") as vm:
                    print(f"guest boot (launch -> agent ready): {time.monotonic() - started:.2f}s"
                          + ("; " + "; ".join(vm.build_log) if vm.build_log else ""))
                    shim = Shim(vm, daemon.address)
                    for warm in (image, big_image):  # pull + build each base once
                        shim.prepare("warm", warm, pb.HOST_BLOCK)
                        shim.release("warm")
                    for name, kind, img in (
                            ("virtio-blk", pb.HOST_BLOCK, image),
                            ("vhost-user-blk", pb.VHOST_USER_BLK, image),
                            (f"virtio-blk, {args.big_mib} MiB image", pb.HOST_BLOCK, big_image)):
                        res: dict[str, list[float]] = {
                            k: [] for k in ("hotplug", "g-wait", "g-fsck", "g-mount", "g-runc",
                                            "create", "to-mounted", "to-output")}
                        for i in range(args.runs):
                            cid = f"{name[:5]}{len(img)}-{i}"
                            rootfs = shim.prepare(cid, img, kind)
                            mark = vm.serial.mark()
                            t0 = time.monotonic()
                            att = shim.hotplug(cid, rootfs)
                            t1 = time.monotonic()
                            vm.agent_call("CreateContainer",
                                          shim.create_request(att, ["cat", "/etc/passwd"]))
                            t2 = time.monotonic()
                            status, out = shim.start_and_wait(cid)
                            t3 = time.monotonic()
                            assert status == 0 and out.startswith("root:"), (status, out)
                            shim.remove_container(cid)
                            line = vm.serial.wait(rf"AGENT-CREATED {cid} (.*)", 30, mark)
                            guest = {k: float(v) for k, v in
                                     (kv.split("=") for kv in line.group(1).split())}
                            res["hotplug"].append(t1 - t0)
                            res["g-wait"].append(guest["wait"])
                            res["g-fsck"].append(guest["fsck"])
                            res["g-mount"].append(guest["mount"])
                            res["g-runc"].append(guest["runc-create"])
                            res["create"].append(t2 - t1)
                            res["to-mounted"].append(t1 - t0 + guest["wait"] + guest["fsck"]
                                                     + guest["mount"])
                            res["to-output"].append(t3 - t0)
                        print(f"{name}:")
                        for key, values in res.items():
                            print(_row(key, values))
                    for label, src in (("small", tree), (f"{args.big_mib} MiB", big_tree)):
                        buf = io.BytesIO()
                        with tarfile.open(fileobj=buf, mode="w") as tar:
                            tar.add(src, arcname=".")
                        rootfs_tar = buf.getvalue()
                        t = _copy_in(vm, rootfs_tar, f"/run/bench/{src.name}.tar")
                        rate = len(rootfs_tar) / t / 1e6
                        print(f"copy-in alternative, {label} image: {len(rootfs_tar) / 1e6:.1f}"
                              f" MB tar of the unpacked rootfs via CopyFile: {t * 1000:.0f} ms"
                              f" ({rate:.1f} MB/s; untar not included)")

            finally:
                daemon.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
