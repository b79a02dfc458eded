"""Fixtures of the interop tier shared by its modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from kata_ipu.testing.prereq import require_paths, require_programs, require_root
from tests.support.gosnap import GOCODE, build_snapshot_suite


@pytest.fixture(scope="module")
def suite() -> Path:
    require_root()
    require_programs("go", "containerd")
    require_paths(f"{GOCODE}/src/github.com/containerd/containerd/snapshots/testsuite",
                  package="golang-github-containerd-containerd-dev")
    return build_snapshot_suite()
