"""kata-ipu-snapshotter against containerd's own snapshotter conformance suite.

containerd's ``snapshots/testsuite`` (Debian's 1.6.20 Go sources, built by
tests.support.gosnap) is the oracle for the snapshotter's local semantics: every sub-test
that containerd's overlayfs passes must pass (``Rename`` is skipped by the 1.6.20 suite for
every snapshotter). Run three ways: on the raw gRPC API (one snapshotter process per sub-test,
as containerd's proxy client sees it), with an IPU address nobody serves (local snapshots
must never need the IPU), and through a real containerd's metadata layer with the
snapshotter as its ``[proxy_plugins.ipu]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kata_ipu.testing.containerd import Containerd
from kata_ipu.testing.snapshotter import SnapshotterProcess
from tests.interop.test_gosnapsuite_harness import SKIPPED, SUBTESTS, _mounts_under
from tests.support.gosnap import run_snapshot_suite

SNAPSHOTTER = str(Path(sys.executable).with_name("kata-ipu-snapshotter"))


def _check(result: object) -> None:
    output = getattr(result, "output", "")[-8000:]
    assert getattr(result, "failed", None) == (), output
    assert set(getattr(result, "skipped", ())) == SKIPPED, output
    assert set(getattr(result, "passed", ())) == SUBTESTS - SKIPPED, output
    assert getattr(result, "ok", False), output


@pytest.mark.parametrize("ipu", ["", "unix:///nonexistent/ipud.sock"],
                         ids=["no-ipu", "ipu-unreachable"])
def test_the_raw_api_passes_containerds_suite(suite: Path, ipu: str) -> None:
    result = run_snapshot_suite(command=[SNAPSHOTTER, "--root", "{root}/state", "--address",
                                         "{socket}", "--ipu-address", ipu],
                                snapshotter="ipu")
    _check(result)
    assert "kata-ipu-snapshotter ready" in result.output  # it really was ours that served
    assert not _mounts_under("/tmp/snapshot-suite-")


def test_through_containerd_as_its_proxy_plugin(suite: Path, tmp_path: Path) -> None:
    with SnapshotterProcess(tmp_path / "sn", ipu_address="") as sn:
        with Containerd(tmp_path / "ctd", extra_config=sn.proxy_plugin_toml()) as ctd:
            result = run_snapshot_suite(containerd_socket=ctd.socket, snapshotter="ipu",
                                        namespace=ctd.namespace)
            left = ctd.ctr("snapshots", "--snapshotter", "ipu", "ls").stdout.split()
        assert "prepare" in sn.log_text()  # containerd's calls reached it
    _check(result)
    assert {"c1", "c2", "a1", "a2", "v1", "v2"} <= set(left)
    assert not _mounts_under("/tmp/snapshot-suite-")
