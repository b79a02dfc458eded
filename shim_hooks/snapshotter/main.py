"""``kata-ipu-snapshotter``: containerd's ``ipu`` snapshotter (a proxy plugin), as a service.

Start-up: load the config → open the metadata → recover (remove what a crash left, mount
the lowers in use again, release the others) → listen → ``READY=1`` to systemd (so that
containerd, ordered after this unit, finds the socket: its CRI plugin does not load when a
configured snapshotter is missing). SIGTERM/SIGINT: stop accepting, finish in-flight calls
(its mounts stay: containers use them; the next start takes them over), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kata_ipu import log as kata_log
from kata_ipu.errors import KataIpuError
from kata_ipu.osutil import notify
from shim_hooks.snapshotter import config as config_mod
from shim_hooks.snapshotter.config import SnapshotterConfig
from shim_hooks.snapshotter.lowers import Lowers
from shim_hooks.snapshotter.remote import RemoteChains
from shim_hooks.snapshotter.service import start_server
from shim_hooks.snapshotter.snapshotter import Snapshotter

log = logging.getLogger("shim_hooks.snapshotter")

SHUTDOWN_GRACE = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-ipu-snapshotter",
        description="containerd snapshotter (proxy plugin) whose image layers come from the "
        "IPU: CRI pulls fetch only manifest and config on the host.")
    p.add_argument("--config", metavar="FILE",
                   help=f"configuration (TOML; default {config_mod.DEFAULT_PATH} if present)")
    p.add_argument("--root", metavar="DIR", help="state directory")
    p.add_argument("--address", metavar="SOCKET", help="unix socket to serve containerd on")
    p.add_argument("--ipu-address", metavar="ADDR",
                   help="kata-ipud, unix:///path or tcp://HOST:PORT; '' for no IPU")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def build(cfg: SnapshotterConfig) -> Snapshotter:
    if not cfg.ipu_address:
        return Snapshotter.open(cfg.root)
    root = cfg.root
    sn = Snapshotter.open(root, remote=RemoteChains(
        cfg.ipu_address, timeout=cfg.pull_timeout, fallback=cfg.fallback,
        fallback_seconds=cfg.fallback_seconds), remove_images=cfg.remove_images,
        lower_linger=cfg.lower_linger)
    sn.lowers = Lowers(root, sn.store, cfg.ipu_address, cfg.host, timeout=cfg.pull_timeout)
    return sn


async def serve(cfg: SnapshotterConfig, *, stop: asyncio.Event | None = None) -> None:
    sn = build(cfg)
    try:
        fixes = await sn.recover()
        server = await start_server(sn, cfg.address)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("kata-ipu-snapshotter ready", extra={
            "address": str(cfg.address), "root": str(cfg.root),
            "ipu": cfg.ipu_address or None, "recovery_fixes": len(fixes)})
        notify.ready(f"serving; recovery made {len(fixes)} fix(es)")
        await stop.wait()
        log.info("kata-ipu-snapshotter stopping")
        notify.stopping()
        await server.stop(SHUTDOWN_GRACE)
        await sn.drain()
    finally:
        sn.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kata_log.setup(args.log_level.upper())
    try:
        cfg = config_mod.load(args.config, root=args.root, address=args.address,
                              ipu_address=args.ipu_address)
    except KataIpuError as exc:
        print(f"kata-ipu-snapshotter: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(cfg))
    except (KataIpuError, OSError) as exc:
        log.error("kata-ipu-snapshotter failed: %s", exc, exc_info=exc)
        print(f"kata-ipu-snapshotter: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
