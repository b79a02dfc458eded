"""``kata-ipu-runtime``: runc-compatible wrapper (lands with the host-integration issue)."""

from __future__ import annotations

import argparse
import sys

from kata_ipu._stub import not_implemented


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-ipu-runtime",
        description="runc-compatible OCI runtime wrapper: swaps the bundle rootfs for a "
        "kata-ipu block device, then runs runc.",
    )
    p.add_argument("--root")
    p.add_argument("--log")
    p.add_argument("--log-format")
    p.add_argument("command", nargs="?")
    return p


def main(argv: list[str] | None = None) -> int:
    return not_implemented(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
