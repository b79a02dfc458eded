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


def test_daemon_refuses_a_missing_config_file(tmp_path: Path) -> None:
    out = subprocess.run([str(BIN / "kata-ipud"), "--config", str(tmp_path / "nope.toml")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "nope.toml: config file not found" in out.stderr


def test_cli_reports_an_unreachable_daemon_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run([str(BIN / "kata-ipu"), "--address", f"unix://{tmp_path}/none.sock",
                          "ls"], capture_output=True, text=True, check=False)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "cannot connect" in out.stderr


def test_cli_usage_error_exits_2() -> None:
    out = subprocess.run([str(BIN / "kata-ipu"), "prepare", "img"], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 2 and "--id" in out.stderr
