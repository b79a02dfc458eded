"""configs/: each containerd snippet loaded into a real containerd with its CRI plugin.

containerd's CRI plugin validates its runtime handlers when it initialises; it then reports its
effective configuration through the CRI ``RuntimeService/Status`` (verbose) call, which is read
here over containerd's real gRPC socket. A handler is registered when it is listed there with
the runtime type and options of the snippet.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import grpc
import pytest

from kata_ipu.testing.containerd import Containerd, mounts_under
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.snapshotter import SnapshotterProcess
from kata_ipu.ttrpc.wire import iter_fields
from shim_hooks.snapshotter import config as snapcfg

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SNIPPETS = sorted((CONFIGS / "containerd").glob("kata-ipu-*.toml"))


def _cri_config(socket: Path) -> dict[str, object]:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        status = channel.unary_unary("/runtime.v1.RuntimeService/Status")
        reply = status(b"\x08\x01", timeout=30)  # StatusRequest{verbose: true}
    info = {}
    for number, _wt, entry in iter_fields(reply):
        if number == 2 and isinstance(entry, bytes):  # map<string, string> info = 2
            kv = {n: v for n, _w, v in iter_fields(entry)}
            assert isinstance(kv[1], bytes) and isinstance(kv[2], bytes)
            info[kv[1].decode()] = kv[2].decode()
    config: dict[str, object] = json.loads(info["config"])
    return config


def test_there_is_a_snippet_for_containerd_1_6_and_1_7() -> None:
    assert [p.name for p in SNIPPETS] == ["kata-ipu-1.6.toml", "kata-ipu-1.7.toml"]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: p.name)
def test_containerd_starts_with_the_kata_ipu_handlers(snippet: Path, tmp_path: Path) -> None:
    require_root()
    require_programs("containerd", "ctr")
    wanted = tomllib.loads(snippet.read_text())["plugins"]["io.containerd.grpc.v1.cri"][
        "containerd"]["runtimes"]
    assert {"kata-ipu", "kata-ipu-runc", "kata-ipu-runtime"} <= set(wanted)
    # the snippet is merged into a stock config, which has the default runc handler
    stock = ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
             '  runtime_type = "io.containerd.runc.v2"\n')
    # the snippet's ipu snapshotter, on a private socket (the CRI plugin needs it to load)
    text = snippet.read_text()
    assert text.count('address = "/run/kata-ipu/snapshotter.sock"') == 1
    with SnapshotterProcess(tmp_path / "sn") as sn:
        text = text.replace("/run/kata-ipu/snapshotter.sock", str(sn.socket))
        with Containerd(tmp_path / "ctd", cri=True, extra_config=stock + text) as ctd:
            plugins = ctd.ctr("plugins", "ls").stdout
            assert re.search(r"^io\.containerd\.grpc\.v1\s+cri\s+\S+\s+ok\s*$", plugins,
                             re.M), plugins
            assert re.search(r"^io\.containerd\.snapshotter\.v1\s+ipu\s+\S+\s+ok\s*$", plugins,
                             re.M), plugins
            cri = _cri_config(ctd.socket)["containerd"]
            assert cri["snapshotter"] == "ipu"  # type: ignore[index]
            assert cri["disableSnapshotAnnotations"] is False  # type: ignore[index]
            runtimes = cri["runtimes"]  # type: ignore[index]
            for name, handler in wanted.items():
                got = runtimes[name]
                assert got["runtimeType"] == handler["runtime_type"]
                assert got["options"] == handler["options"]
                assert got["ContainerAnnotations"] == got["PodAnnotations"] == [
                    "io.katacontainers.*"]
            assert runtimes["kata-ipu"]["runtimeType"] == "io.containerd.kata-ipu.v2"
    assert not mounts_under(tmp_path)


def test_the_snapshotter_config_file_is_its_defaults() -> None:
    assert snapcfg.load(str(CONFIGS / "snapshotter.toml"), env={}) == snapcfg.SnapshotterConfig()
    shim = tomllib.loads((CONFIGS / "shim.toml").read_text())
    assert shim["snapshotter_root"] == str(snapcfg.SnapshotterConfig().root)


def test_runtimeclass_handlers_exist_in_the_snippets() -> None:
    text = (CONFIGS / "kubernetes" / "runtimeclass.yaml").read_text()
    handlers = re.findall(r"^handler: (\S+)$", text, re.M)
    assert handlers == ["kata-ipu", "kata-ipu-runc"]
    assert text.count("apiVersion: node.k8s.io/v1") == 2
    for snippet in SNIPPETS:
        runtimes = tomllib.loads(snippet.read_text())["plugins"]["io.containerd.grpc.v1.cri"][
            "containerd"]["runtimes"]
        assert set(handlers) <= set(runtimes)


@pytest.mark.parametrize(("name", "binary"), [("kata-ipud", "kata-ipud"),
                                              ("kata-ipu-shimd", "kata-ipu-shimd"),
                                              ("kata-ipu-snapshotter", "kata-ipu-snapshotter")])
def test_systemd_units_verify(tmp_path: Path, name: str, binary: str) -> None:
    require_programs("systemd-analyze")
    unit = (CONFIGS / "systemd" / f"{name}.service").read_text()
    assert re.search(r"^Type=notify$", unit, re.M)
    assert re.search(r"^Before=containerd\.service$", unit, re.M)
    # restarting the daemon must not kill what it serves (loop devices; proxies)
    assert re.search(r"^KillMode=process$", unit, re.M)
    # systemd-analyze checks syntax and that ExecStart exists: point it at a real binary
    service = tmp_path / f"{name}.service"
    service.write_text(unit.replace(f"/usr/bin/{binary}", "/bin/true"))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(service)],
                         capture_output=True, text=True, check=False)
    problems = [line for line in out.stderr.splitlines()
                if f"{name}.service" in line and "containerd.service" not in line]
    assert problems == [], out.stderr
