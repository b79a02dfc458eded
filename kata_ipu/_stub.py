"""Shared helper for console scripts whose issue has not landed yet."""

from __future__ import annotations

import argparse
import sys


def not_implemented(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse (so ``--help`` works and bad flags are reported), then refuse with exit 2."""
    parser.parse_known_args(argv)
    print(f"{parser.prog}: not implemented yet", file=sys.stderr)
    return 2
