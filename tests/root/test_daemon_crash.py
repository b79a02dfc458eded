"""kill -9 of kata-ipud during pull, build, clone and export; then restart and repair.

Crash points: a real SIGKILL while a blob download is stalled (through a fault proxy), and
the daemon's ``KATA_IPU_CRASH_AT`` hook (it SIGKILLs itself between a data change and the
state record that commits it). After the restart the state must be consistent, nothing may
leak, and a repeated Prepare must succeed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu import api
from kata_ipu.api import kataipu_pb2 as pb
from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import Fault, FaultProxy, RegistryServer
from kata_ipu.ttrpc import Client
from tests.support.images import busybox_registry

CLI = str(Path(sys.executable).with_name("kata-ipu"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    require_root()
    require_programs("docker-registry", "skopeo", "mkfs.ext4", "mkfs.xfs")
    # a 4 MiB incompressible-ish layer so a stalled download is clearly mid-blob
    filler = LayerBuilder().file("data/blob", bytes(range(256)) * 16384).build()
    with busybox_registry(tmp_path_factory.mktemp("registry"), "crash/busybox",
                          {"v1": [filler]}, compression="none") as reg:
        yield reg






def _assert_clean_and_usable(d: IpuDaemon, ref: str) -> None:
    assert json.loads(d.cli("ls", "--json").stdout) == []
    assert d.volume_loops() == []
    build = d.root / "block" / "data" / "build"
    assert not build.exists() or not any(build.iterdir())
    dev = json.loads(d.cli("prepare", "--id", "again", ref, "--json").stdout)
    assert Path(dev["path"]).exists()
    d.cli("release", "again")
    assert d.volume_loops() == []


@pytest.mark.parametrize("stage", ["build", "clone", "export"])
def test_crash_point_then_restart(stage: str, registry: RegistryServer,
                                  tmp_path: Path) -> None:
    ref = f"{registry.address}/crash/busybox:v1"
    d = IpuDaemon(tmp_path, pool_size="2G")
    try:
        d.start(env={"KATA_IPU_CRASH_AT": stage})
        failed = d.cli("prepare", "--id", "victim", ref, check=False)
        assert failed.returncode == 1 and "closed" in failed.stderr
        assert d.wait_exit() == -9
        d.start()
        log = d.log.read_text()
        expected = {
            "build": "recovery: removed partial build",
            "clone": "recovery: rolled back creating volume victim",
            "export": "recovery: rolled back creating volume victim",
        }[stage]
        assert expected in log, log[-3000:]
        _assert_clean_and_usable(d, ref)
    finally:
        d.teardown()
    assert d.volume_loops() == []


def test_kill_during_a_stalled_blob_download(registry: RegistryServer, tmp_path: Path) -> None:
    stall = Fault("stall", match=lambda method, path: method == "GET" and "/blobs/" in path
                  and path.endswith(_largest_layer(registry)), after_bytes=1 << 20, times=1)
    with FaultProxy(registry.address, [stall]) as proxy:
        ref = f"{proxy.address}/crash/busybox:v1"
        d = IpuDaemon(tmp_path, pool_size="2G")
        try:
            d.start()
            pending = subprocess.Popen([CLI, "--address", d.address, "prepare", "--id", "p1",
                                        ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert _wait_downloading(d), "the pull never reached the stalled blob"
            d.kill()
            pending.wait(30)
            assert pending.returncode == 1
            d.start()
            _assert_clean_and_usable(d, ref)  # the stall fault was one-shot: this pull works
        finally:
            d.teardown()


def _largest_layer(registry: RegistryServer) -> str:
    blobs = registry.storage / "docker/registry/v2/blobs/sha256"
    biggest = max(blobs.glob("*/*/data"), key=lambda p: p.stat().st_size)
    return biggest.parent.name


def _wait_downloading(d: IpuDaemon, timeout: float = 60) -> bool:
    async def poll() -> bool:
        deadline = time.monotonic() + timeout
        async with await Client.connect(d.address) as c:
            while time.monotonic() < deadline:
                st = await c.call_message(api.IMAGE_SERVICE, "Status", pb.PullStatusRequest(),
                                          pb.PullStatusResponse, timeout=5)
                if any(p.bytes_done >= 1 << 20 for p in st.pulls):
                    return True
                await asyncio.sleep(0.1)
        return False

    return asyncio.run(poll())
