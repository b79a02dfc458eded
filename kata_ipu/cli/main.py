"""``kata-ipu``: command-line client of kata-ipud (lands with the daemon issue)."""

from __future__ import annotations

import argparse
import os
import sys

from kata_ipu._stub import not_implemented


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-ipu", description="Client of the kata-ipud service.")
    p.add_argument("--address", default=os.environ.get("KATA_IPU_ADDRESS",
                                                       "unix:///run/kata-ipu/ipud.sock"),
                   help="daemon address (env KATA_IPU_ADDRESS)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("pull", "pull an image and build its base block image"),
        ("images", "list images"),
        ("rmi", "remove an image"),
        ("prepare", "prepare a container rootfs (clone + export)"),
        ("release", "release a container rootfs"),
        ("ls", "list prepared rootfs volumes"),
        ("gc", "garbage-collect unused blobs and bases"),
        ("check", "check that everything the daemon needs is present"),
        ("env", "print the environment"),
    ):
        sub.add_parser(name, help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    return not_implemented(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
