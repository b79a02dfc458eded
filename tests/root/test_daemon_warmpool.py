"""kata-ipud's warm pool (``[rootfs] warm_clones``): exported spare clones of images in use.

A real registry, pool and loop devices. The kernel is the oracle: which loop devices serve
which pool files (/sys/block/loop*/loop/backing_file), what a device holds once mounted. Every
test ends with the daemon stopped and no loop device or mount of its pool left.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu.daemon.warmpool import PREFIX
from kata_ipu.testing.daemon import IpuDaemon, loops_under, running
from kata_ipu.testing.ocibuild import LayerBuilder
from kata_ipu.testing.prereq import require_programs, require_root
from tests.support.images import busybox_registry


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_root()
    require_programs("docker-registry", "skopeo", "mkfs.ext4", "mkfs.xfs")
    motd = LayerBuilder().file("etc/motd", b"warm pool\n").build()
    with busybox_registry(tmp_path_factory.mktemp("registry"), "warm/busybox",
                          {"v1": [motd]}) as reg:
        yield f"{reg.address}/warm/busybox:v1"


@pytest.fixture
def daemon(tmp_path: Path, ref: str) -> Iterator[IpuDaemon]:
    with running(tmp_path, pool_size="2G", extra_config="[rootfs]\nwarm_clones = 1\n") as d:
        yield d


def _spares(d: IpuDaemon) -> dict[str, str]:
    """Idle spares: exported spare files no listed volume uses (a taken spare keeps its
    file name)."""
    used = ({str(v["path"]) for v in json.loads(d.cli("ls", "--json").stdout)}
            if d.proc is not None else set())
    return {dev: f for dev, f in loops_under(d.root / "block" / "data").items()
            if Path(f).name.startswith(PREFIX) and dev not in used}


def _metric(d: IpuDaemon, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", d.metrics_text(), re.M)
    return float(m.group(1)) if m else -1.0


def _wait_spares(d: IpuDaemon, n: int, timeout: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (len(spares := _spares(d)) != n or _metric(d, "kata_ipu_warm_spares") != n):
        assert time.monotonic() < deadline, f"expected {n} spares, have {spares}"
        time.sleep(0.05)
    return spares


def _prepare(d: IpuDaemon, cid: str, ref: str) -> dict[str, object]:
    out = d.cli("prepare", "--id", cid, ref, "--json")
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_a_warm_prepare_takes_the_spare_and_the_pool_refills(daemon: IpuDaemon, ref: str,
                                                             tmp_path: Path) -> None:
    first = _prepare(daemon, "c1", ref)
    (spare_dev, spare_file), = _wait_spares(daemon, 1).items()
    assert spare_dev != first["path"]
    second = _prepare(daemon, "c2", ref)
    assert second["path"] == spare_dev  # handed out, not made while the caller waited
    listed = json.loads(daemon.cli("ls", "--json").stdout)
    assert sorted(v["container_id"] for v in listed) == ["c1", "c2"]  # spares are not listed
    # the spare is a clone of the right image, and now c2's alone
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ext4", spare_dev, str(mnt)], check=True)
    try:
        assert (mnt / "etc/motd").read_text() == "warm pool\n"
        (mnt / "etc/motd").write_text("c2 only\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    (new_dev, new_file), = _wait_spares(daemon, 1).items()
    assert new_file != spare_file
    subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", new_dev, str(mnt)], check=True)
    try:
        assert (mnt / "etc/motd").read_text() == "warm pool\n"  # not c2's write
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    for cid in ("c1", "c2"):
        daemon.cli("release", cid)
    assert set(loops_under(daemon.root / "block" / "data")) == {new_dev}
    assert daemon.stop() == 0
    assert loops_under(daemon.root / "block" / "data") == {}, "spares outlived the daemon"


def test_removing_the_image_drops_its_spares(daemon: IpuDaemon, ref: str) -> None:
    _prepare(daemon, "c1", ref)
    _wait_spares(daemon, 1)
    daemon.cli("release", "c1")
    daemon.cli("rmi", ref)
    assert _spares(daemon) == {}
    assert _metric(daemon, "kata_ipu_warm_spares") == 0


def test_spares_of_a_killed_daemon_are_removed_as_orphans(daemon: IpuDaemon, ref: str) -> None:
    _prepare(daemon, "c1", ref)
    _wait_spares(daemon, 1)
    daemon.kill()
    assert len(_spares(daemon)) == 1  # nobody recorded it
    daemon.start()
    assert _spares(daemon) == {}
    assert "recovery:" in daemon.log.read_text()
    listed = json.loads(daemon.cli("ls", "--json").stdout)
    assert [v["container_id"] for v in listed] == ["c1"]
    daemon.cli("release", "c1")


def test_the_spare_prefix_is_not_a_container_id(daemon: IpuDaemon, ref: str) -> None:
    out = daemon.cli("prepare", "--id", f"{PREFIX}mine", ref, check=False)
    assert out.returncode != 0
    assert "reserved for the warm pool" in out.stderr
