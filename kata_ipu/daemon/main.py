"""``kata-ipud``: the IPU image service.

Start-up order: load the config → open state, content store and block pool → recover
(reconcile the database with the pool, log every fix) → listen → ``READY=1`` to systemd.
SIGTERM/SIGINT: stop accepting, let in-flight calls finish (30 s), close, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kata_ipu import log as kata_log
from kata_ipu.daemon import config as config_mod
from kata_ipu.daemon.config import Config
from kata_ipu.daemon.engine import Engine
from kata_ipu.daemon.metrics import Metrics
from kata_ipu.daemon.service import IpuServices, read_token
from kata_ipu.errors import KataIpuError
from kata_ipu.osutil import notify
from kata_ipu.ttrpc import Server

log = logging.getLogger("kata_ipu.daemon")

SHUTDOWN_GRACE = 30.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-ipud",
        description="IPU image service: pulls and caches images, unpacks each once into a "
        "block image, clones it copy-on-write per container and exports the clone.",
    )
    p.add_argument("--config", metavar="FILE", default=config_mod.DEFAULT_CONFIG,
                   help="daemon configuration (TOML; default %(default)s)")
    p.add_argument("--root", metavar="DIR", help="state directory (default /var/lib/kata-ipu)")
    p.add_argument("--address", metavar="ADDR", action="append",
                   help="listen address, unix:///path or tcp://HOST:PORT (repeatable; "
                   "default unix:///run/kata-ipu/ipud.sock)")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics on this loopback address")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


async def serve(cfg: Config, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the daemon until ``stop`` is set (or SIGTERM/SIGINT)."""
    metrics = Metrics.create()
    token = read_token(cfg.tcp.token_file) if cfg.tcp.token_file else None
    engine = await Engine.open(cfg, metrics)
    server = Server()
    try:
        fixes = await engine.recovery.run()
        IpuServices(engine, token).register(server)
        for address in cfg.addresses:
            await server.listen(address, mode=cfg.socket_mode)
        if cfg.metrics.address:
            metrics.serve(cfg.metrics.address)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("kata-ipud ready", extra={
            "addresses": [str(a) for a in server.addresses], "recovery_fixes": len(fixes),
            "root": str(cfg.root), "backend": engine.target.pool.backend})
        notify.ready(f"serving; recovery made {len(fixes)} fix(es)")
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("kata-ipud stopping")
        notify.stopping()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.shutdown(timeout=SHUTDOWN_GRACE)
    finally:
        await server.close()
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kata_log.setup(args.log_level.upper())
    try:
        cfg = config_mod.load(args.config, root=args.root, addresses=args.address,
                              metrics=args.metrics_address,
                              required=args.config != config_mod.DEFAULT_CONFIG)
    except KataIpuError as exc:
        print(f"kata-ipud: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(cfg))
    except KataIpuError as exc:
        log.error("kata-ipud failed: %s", exc, exc_info=exc)
        print(f"kata-ipud: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
