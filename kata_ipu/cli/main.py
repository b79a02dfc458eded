"""``kata-ipu``: command-line client of kata-ipud.

Every command is one or two ttrpc calls to the daemon (``--address`` or
``$KATA_IPU_ADDRESS``). Listings and ``prepare`` print JSON with ``--json``. Errors print one
line on stderr naming the cause and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, TextIO

from google.protobuf import json_format

from kata_ipu import api
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.errors import KataIpuError
from kata_ipu.ttrpc import Client, Metadata

DEFAULT_ADDRESS = "unix:///run/kata-ipu/ipud.sock"
EXPORTS = {"host-block": pb.HOST_BLOCK, "vhost-user-blk": pb.VHOST_USER_BLK, "nbd": pb.NBD,
           "vfio-pci": pb.VFIO_PCI}
FSTYPES = {"ext4": pb.EXT4, "erofs": pb.EROFS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-ipu", description="Client of the kata-ipud service.")
    p.add_argument("--address", default=os.environ.get("KATA_IPU_ADDRESS", DEFAULT_ADDRESS),
                   help="daemon address, unix:///path or tcp://HOST:PORT "
                   "(env KATA_IPU_ADDRESS; default %(default)s)")
    p.add_argument("--token-file", default=os.environ.get("KATA_IPU_TOKEN_FILE"),
                   help="shared token for TCP addresses (env KATA_IPU_TOKEN_FILE)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-call deadline in seconds")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("pull", help="pull an image and build its base block image")
    c.add_argument("image")
    c.add_argument("--platform", default="", help="os/arch[/variant]")
    c.add_argument("--fstype", choices=sorted(FSTYPES), default=None)
    c.add_argument("--no-build", action="store_true", help="only fetch into the content store")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("images", help="list images")
    c.add_argument("filter", nargs="?", default="")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("rmi", help="remove an image")
    c.add_argument("image")
    c.add_argument("--force", action="store_true", help="even while clones exist")

    c = sub.add_parser("prepare", help="prepare a container rootfs (clone + export)")
    c.add_argument("--id", required=True, dest="container_id")
    c.add_argument("image")
    c.add_argument("--export", choices=sorted(EXPORTS), default="host-block")
    c.add_argument("--fstype", choices=sorted(FSTYPES), default=None)
    c.add_argument("--layers", type=int, default=0,
                   help="clone the base of the image's first N layers only (default: all)")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("release", help="release a container rootfs")
    c.add_argument("container_id")

    c = sub.add_parser("ls", help="list prepared rootfs volumes")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("stat", help="show one prepared rootfs and its usage")
    c.add_argument("container_id")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("gc", help="garbage-collect unused bases and blobs")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("check", help="check that everything the daemon needs is present")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("env", help="print the daemon's and the client's environment")
    c.add_argument("--json", action="store_true")
    return p


def _json(msg: Any) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return out


def device_json(rootfs: pb.Rootfs) -> dict[str, Any]:
    d = rootfs.device
    return {
        "container_id": rootfs.container_id, "image": rootfs.image,
        "image_digest": rootfs.image_digest, "kind": pb.ExportKind.Name(d.kind),
        "path": d.path, "major": d.major, "minor": d.minor,
        "fstype": pb.FsType.Name(d.fstype).lower() if d.fstype else "",
        "serial": d.serial, "size": d.size_bytes, "vhost_socket": d.vhost_socket,
        "read_only": d.read_only,
    }


class Cli:
    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.args = args
        self.out = out
        md: list[tuple[str, str]] = []
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                md.append(("authorization", f"Bearer {f.read().strip()}"))
        self.metadata = Metadata(md)

    def emit(self, data: Any) -> None:
        print(json.dumps(data, indent=2, sort_keys=True), file=self.out)

    async def call(self, client: Client, service: str, method: str, req: Any,
                   resp_type: Any) -> Any:
        return await client.call_message(service, method, req, resp_type,
                                         timeout=self.args.timeout, metadata=self.metadata)

    async def run(self) -> int:
        a = self.args
        async with await Client.connect(a.address) as client:
            handler = getattr(self, "cmd_" + a.command)
            result: int = await handler(client)
            return result

    async def cmd_pull(self, client: Client) -> int:
        a = self.args
        req = pb.PullRequest(image=a.image, skip_build=a.no_build,
                             fstype=FSTYPES.get(a.fstype or "", pb.FS_UNSPECIFIED))
        if a.platform:
            os_, _, rest = a.platform.partition("/")
            arch, _, variant = rest.partition("/")
            req.platform.CopyFrom(pb.Platform(os=os_, architecture=arch, variant=variant))
        call = asyncio.ensure_future(self.call(client, api.IMAGE_SERVICE, "Pull", req,
                                               pb.PullResponse))
        if not a.json:
            print(f"pulling {a.image}", file=self.out, flush=True)
        await self._progress(client, a.image, call)
        resp: pb.PullResponse = await call
        if a.json:
            self.emit(_json(resp.image))
        else:
            img = resp.image
            built = ", ".join(f"{pb.FsType.Name(b.fstype).lower()} base "
                              f"{b.size_bytes >> 20} MiB" for b in img.bases)
            print(f"{img.name} {img.digest}" + (f" ({built})" if built else ""),
                  file=self.out)
        return 0

    async def _progress(self, client: Client, image: str, call: asyncio.Future[Any]) -> None:
        """A progress bar on a TTY; one line per phase change otherwise."""
        tty = self.out.isatty() and not self.args.json
        last_phase = ""
        while not call.done():
            await asyncio.wait([call], timeout=0.25)
            if call.done():
                break
            try:
                status = await client.call_message(
                    api.IMAGE_SERVICE, "Status", pb.PullStatusRequest(), pb.PullStatusResponse,
                    timeout=5, metadata=self.metadata)
            except KataIpuError:
                continue
            for p in status.pulls:
                phase = pb.PullPhase.Name(p.phase).lower()
                if tty:
                    total = max(p.bytes_total, 1)
                    width = 30
                    filled = int(width * p.bytes_done / total)
                    bar = "#" * filled + "-" * (width - filled)
                    print(f"\r{phase:<12} [{bar}] {p.bytes_done >> 20}/{p.bytes_total >> 20} "
                          "MiB", end="", file=self.out, flush=True)
                elif phase != last_phase and not self.args.json:
                    print(f"{phase} {p.image}", file=self.out, flush=True)
                last_phase = phase
        if tty and last_phase:
            print(file=self.out)

    async def cmd_images(self, client: Client) -> int:
        resp: pb.ListImagesResponse = await self.call(
            client, api.IMAGE_SERVICE, "List", pb.ListImagesRequest(filter=self.args.filter),
            pb.ListImagesResponse)
        if self.args.json:
            self.emit([_json(i) for i in resp.images])
            return 0
        print(f"{'NAME':<48} {'DIGEST':<19} {'SIZE':>9} {'BASES':<12} CLONES", file=self.out)
        for i in resp.images:
            bases = ",".join(pb.FsType.Name(b.fstype).lower()
                             + (f"[:{b.layers}]" if b.layers else "") for b in i.bases) or "-"
            print(f"{i.name:<48} {i.digest[:19]:<19} {i.size_bytes >> 20:>6} MiB "
                  f"{bases:<12} {i.clones}", file=self.out)
        return 0

    async def cmd_rmi(self, client: Client) -> int:
        await self.call(client, api.IMAGE_SERVICE, "Remove",
                        pb.RemoveImageRequest(image=self.args.image, force=self.args.force),
                        pb.RemoveImageResponse)
        print(f"removed {self.args.image}", file=self.out)
        return 0

    async def cmd_prepare(self, client: Client) -> int:
        a = self.args
        req = pb.PrepareRequest(
            container_id=a.container_id, image=a.image, export=EXPORTS[a.export],
            options=pb.PrepareOptions(fstype=FSTYPES.get(a.fstype or "", pb.FS_UNSPECIFIED),
                                      layers=a.layers))
        resp: pb.PrepareResponse = await self.call(client, api.ROOTFS_SERVICE, "Prepare", req,
                                                   pb.PrepareResponse)
        dev = device_json(resp.rootfs)
        dev["cold"] = resp.cold
        if a.json:
            self.emit(dev)
        else:
            where = dev["vhost_socket"] or dev["path"]
            print(f"{a.container_id} {where} {dev['major']}:{dev['minor']} {dev['fstype']} "
                  f"serial={dev['serial']} {'cold' if resp.cold else 'warm'}", file=self.out)
        return 0

    async def cmd_release(self, client: Client) -> int:
        await self.call(client, api.ROOTFS_SERVICE, "Release",
                        pb.ReleaseRequest(container_id=self.args.container_id),
                        pb.ReleaseResponse)
        print(f"released {self.args.container_id}", file=self.out)
        return 0

    async def cmd_ls(self, client: Client) -> int:
        resp: pb.ListRootfsResponse = await self.call(
            client, api.ROOTFS_SERVICE, "List", pb.ListRootfsRequest(), pb.ListRootfsResponse)
        if self.args.json:
            self.emit([device_json(r) for r in resp.rootfs])
            return 0
        print(f"{'CONTAINER':<40} {'DEVICE':<28} {'IMAGE'}", file=self.out)
        for r in resp.rootfs:
            where = r.device.vhost_socket or r.device.path
            print(f"{r.container_id:<40} {where:<28} {r.image}", file=self.out)
        return 0

    async def cmd_stat(self, client: Client) -> int:
        resp: pb.StatRootfsResponse = await self.call(
            client, api.ROOTFS_SERVICE, "Stat",
            pb.StatRootfsRequest(container_id=self.args.container_id), pb.StatRootfsResponse)
        data = device_json(resp.rootfs)
        data["allocated_bytes"] = resp.usage.allocated_bytes
        if self.args.json:
            self.emit(data)
        else:
            for k in sorted(data):
                print(f"{k}: {data[k]}", file=self.out)
        return 0

    async def cmd_gc(self, client: Client) -> int:
        resp: pb.GcResponse = await self.call(client, api.SYSTEM_SERVICE, "Gc", pb.GcRequest(),
                                              pb.GcResponse)
        if self.args.json:
            self.emit(_json(resp))
        else:
            print(f"removed {resp.bases_removed} base(s), reclaimed "
                  f"{resp.bytes_reclaimed >> 20} MiB", file=self.out)
        return 0

    async def cmd_check(self, client: Client) -> int:
        resp: pb.CheckResponse = await self.call(client, api.SYSTEM_SERVICE, "Check",
                                                 pb.CheckRequest(), pb.CheckResponse)
        results = [("daemon", True, f"reachable at {self.args.address}")] + [
            (r.name, r.ok, r.detail) for r in resp.results]
        if self.args.json:
            self.emit([{"name": n, "ok": ok, "detail": d} for n, ok, d in results])
        else:
            for name, ok, detail in results:
                print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", file=self.out)
        return 0 if all(ok for _, ok, _ in results) else 1

    async def cmd_env(self, client: Client) -> int:
        resp: pb.InfoResponse = await self.call(client, api.SYSTEM_SERVICE, "Info",
                                                pb.InfoRequest(), pb.InfoResponse)
        data = {"daemon": _json(resp), "client": {"address": self.args.address,
                                                   "python": sys.version.split()[0]}}
        if self.args.json:
            self.emit(data)
        else:
            for section, values in data.items():
                print(f"[{section}]", file=self.out)
                for k, v in values.items():
                    print(f"  {k} = {json.dumps(v)}", file=self.out)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        return asyncio.run(Cli(args, sys.stdout).run())
    except KataIpuError as exc:
        print(f"kata-ipu: {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kata-ipu: {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        if os.environ.get("KATA_IPU_CLI_TIMING"):
            print(f"kata-ipu: {(time.monotonic() - started) * 1000:.1f} ms", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
