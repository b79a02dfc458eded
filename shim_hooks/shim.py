"""``containerd-shim-kata-ipu-v2``: shim v2 proxy (lands with the host-integration issue)."""

from __future__ import annotations

import argparse
import sys

from kata_ipu._stub import not_implemented


def build_parser() -> argparse.ArgumentParser:
    # containerd passes Go-style single-dash long flags: -namespace ns -address a -id x start
    p = argparse.ArgumentParser(
        prog="containerd-shim-kata-ipu-v2",
        description="containerd shim v2 (io.containerd.kata-ipu.v2): asks kata-ipud for a "
        "block-device rootfs and forwards the Task API to the real shim.",
    )
    for flag in ("-namespace", "-address", "-publish-binary", "-id", "-bundle", "-socket"):
        p.add_argument(flag)
    p.add_argument("-debug", action="store_true")
    p.add_argument("action", nargs="?", choices=["start", "delete"])
    return p


def main(argv: list[str] | None = None) -> int:
    return not_implemented(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
