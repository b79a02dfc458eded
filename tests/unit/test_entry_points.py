"""The four console scripts are installed, answer --help, and refuse work until they land."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
SCRIPTS = ["kata-ipud", "kata-ipu", "containerd-shim-kata-ipu-v2", "kata-ipu-runtime"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works(script: str) -> None:
    out = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {script}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unimplemented_exits_2(script: str) -> None:
    out = subprocess.run([str(BIN / script)], capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "not implemented yet" in out.stderr
