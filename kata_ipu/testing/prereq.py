"""Prerequisite checks for tests: skip with a reason that names what is missing.

Under ``KATA_IPU_NO_SKIP=1`` (set by ``scripts/test``, hence by CI) tests/conftest.py turns
every skip into a failure, because bootstrap installed everything and a skip would hide a test
that did not run.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_programs(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"missing programs: {', '.join(missing)} (run scripts/bootstrap)")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts, real daemons)")


def require_paths(*paths: str, package: str) -> None:
    """Files or directories a Debian package installs (e.g. Go sources under /usr/share/gocode)."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: install {package} (run scripts/bootstrap)")
