"""``kata-ipud``: the IPU image service (lands with the daemon issue)."""

from __future__ import annotations

import argparse
import sys

from kata_ipu._stub import not_implemented


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-ipud",
        description="IPU image service: pulls and caches images, unpacks each once into a "
        "block image, clones it copy-on-write per container and exports the clone.",
    )
    p.add_argument("--config", metavar="FILE", default="/etc/kata-ipu/ipud.toml",
                   help="daemon configuration (TOML)")
    p.add_argument("--root", metavar="DIR", default="/var/lib/kata-ipu", help="state directory")
    p.add_argument("--address", metavar="ADDR", action="append",
                   help="listen address, unix:///path or tcp://HOST:PORT (repeatable; "
                   "default unix:///run/kata-ipu/ipud.sock)")
    return p


def main(argv: list[str] | None = None) -> int:
    return not_implemented(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
