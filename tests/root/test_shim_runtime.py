"""kata-ipu-runtime against plain runc: the same lifecycle, observed the same way.

runtime-tools style (notes/ttrpc_shim.md §6): one bundle with hooks that save the state JSON
they get on stdin, driven through create/state/start/kill/delete with a pid file, once by
``runc`` and once by ``kata-ipu-runtime`` (with an IPU image annotation). Every exit code, state
and hook input must match, except that the wrapper's container has the IPU's block device as
``/`` (read from ``/proc/<pid>/mounts``) and that its volume is released at ``delete``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kata_ipu.testing.daemon import IpuDaemon
from kata_ipu.testing.ocibuild import LayerBuilder, OciLayout, busybox_tree
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.testing.registry import RegistryServer, push

WRAPPER = str(Path(sys.executable).with_name("kata-ipu-runtime"))
CLI = str(Path(sys.executable).with_name("kata-ipu"))
HOOKS = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")


class World:
    def __init__(self, work: Path, ref: str, missing: str, ipud: IpuDaemon,
                 env: dict[str, str]) -> None:
        self.work = work
        self.ref = ref
        self.missing = missing
        self.ipud = ipud
        self.env = env

    def volumes(self) -> list[dict[str, Any]]:
        out = subprocess.run([CLI, "--address", self.ipud.address, "ls", "--json"],
                             capture_output=True, text=True, check=True, timeout=60)
        result: list[dict[str, Any]] = json.loads(out.stdout)
        return result


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_root()
    require_programs("runc", "docker-registry", "skopeo", "mkfs.ext4", "mkfs.xfs", "busybox")
    work = tmp_path_factory.mktemp("runtime")
    (work / "reg").mkdir()
    (work / "ipud").mkdir()
    with RegistryServer(work / "reg") as reg:
        layout = OciLayout(work / "oci")
        base = LayerBuilder().tree(busybox_tree(work / "tree")).build()
        layout.add_image([base, LayerBuilder().file("etc/motd", b"ipu\n").build()], ref="v1")
        ref = f"{reg.address}/rt/busybox:v1"
        push(work / "oci", "v1", ref)
        ipud = IpuDaemon(work / "ipud", pool_size="2G", insecure_registries=(reg.address,))
        ipud.start()
        try:
            cfg = work / "shim.toml"
            cfg.write_text(f'[runtime]\nstate_dir = "{work}/rt-state"\n')
            env = dict(os.environ, KATA_IPU_ADDRESS=ipud.address,
                       KATA_IPU_SHIM_CONFIG=str(cfg))
            yield World(work, ref, f"{reg.address}/rt/busybox:nope", ipud, env)
        finally:
            ipud.teardown()
    assert str(work) not in Path("/proc/mounts").read_text(), "mounts leaked"


def _bundle(world: World, where: Path, args: list[str]) -> Path:
    bundle = where / "bundle"
    shutil.copytree(world.work / "tree", bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args
    spec["root"]["readonly"] = False
    spec["annotations"] = {"io.katacontainers.ipu.image": world.ref}
    spec["hooks"] = {h: [{"path": "/bin/sh", "args": ["sh", "-c", f"cat > {where}/{h}.json"]}]
                     for h in HOOKS}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _run(runtime: str, world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([runtime, *args], env=world.env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True,
                          timeout=120, check=False)


def _create(runtime: str, world: World, root: Path, log: Path, bundle: Path, pidfile: Path,
            cid: str) -> int:
    # runc create leaves the container holding its stdio: no pipes, or run() never returns
    with open(bundle.parent / "create.err", "w") as err:
        return subprocess.run([runtime, "--root", str(root), "--log", str(log),
                               "--log-format", "json", "create", "--bundle", str(bundle),
                               "--pid-file", str(pidfile), cid], env=world.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                              timeout=120, check=False).returncode


def _root_mount(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/mounts").read_text().splitlines():
        source, point, fstype = line.split()[:3]
        if point == "/":
            return source, fstype
    raise AssertionError("no /")


def _lifecycle(runtime: str, world: World, where: Path) -> list[Any]:
    """Drive one container through its life; return what an observer sees (normalized)."""
    where.mkdir()
    root, log, pidfile, cid = where / "root", where / "log.json", where / "init.pid", "lc1"
    bundle = _bundle(world, where, ["sleep", "600"])
    seen: list[Any] = []
    g = ["--root", str(root)]
    rc = _create(runtime, world, root, log, bundle, pidfile, cid)
    seen.append(("create", rc, (where / "create.err").read_text()))
    pid = int(pidfile.read_text())
    state = json.loads(_run(runtime, world, *g, "state", cid).stdout)
    seen.append(("state", state["status"], state["pid"] == pid, state["bundle"] == str(bundle)))
    for hook in ("prestart", "createRuntime", "createContainer"):
        got = json.loads((where / f"{hook}.json").read_text())
        seen.append((hook, got["id"], got["status"], got["pid"] == pid, got["bundle"]
                     == str(bundle), got["annotations"]))
    res = _run(runtime, world, *g, "start", cid)
    seen.append(("start", res.returncode, res.stdout, res.stderr))
    seen.append(("state", json.loads(_run(runtime, world, *g, "state", cid).stdout)["status"]))
    got = json.loads((where / "poststart.json").read_text())
    seen.append(("poststart", got["status"], got["pid"] == pid))
    root_source = _root_mount(pid)
    res = _run(runtime, world, *g, "delete", cid)  # running, no --force: refused
    seen.append(("delete-running", res.returncode, "is not stopped" in res.stderr))
    res = _run(runtime, world, *g, "kill", cid, "9")
    seen.append(("kill", res.returncode))
    deadline = time.monotonic() + 30
    while json.loads(_run(runtime, world, *g, "state", cid).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    res = _run(runtime, world, *g, "kill", cid, "9")
    seen.append(("kill-stopped", res.returncode, "container not running" in res.stderr))
    res = _run(runtime, world, *g, "delete", cid)
    seen.append(("delete", res.returncode, res.stdout, res.stderr))
    got = json.loads((where / "poststop.json").read_text())
    seen.append(("poststop", got["id"], got["status"]))
    res = _run(runtime, world, *g, "state", cid)
    seen.append(("state-gone", res.returncode, "does not exist" in res.stderr))
    res = _run(runtime, world, *g, "delete", cid)
    seen.append(("delete-again", res.returncode, "does not exist" in res.stderr))
    res = _run(runtime, world, "nosuchcommand")
    seen.append(("unknown-command", res.returncode))
    for argv in (["--version"], ["features"], [*g, "list", "--format", "json"]):
        res = _run(runtime, world, *argv)
        seen.append((argv[-1], res.returncode, res.stdout))
    return [seen, root_source, bundle]


def test_wrapper_lifecycle_matches_runc(world: World, tmp_path: Path) -> None:
    plain, plain_root, _ = _lifecycle("runc", world, tmp_path / "runc")
    wrapped, wrapped_root, bundle = _lifecycle(WRAPPER, world, tmp_path / "wrapper")
    assert wrapped == plain
    assert [s[0] for s in plain][:2] == ["create", "state"] and plain[0][1] == 0
    assert plain_root[1] != "ext4" or not plain_root[0].startswith("/dev/loop")
    assert wrapped_root[0].startswith("/dev/loop") and wrapped_root[1] == "ext4"
    # after delete: volume released, mount gone, bundle pointing at its own rootfs again
    assert world.volumes() == []
    assert f"{bundle}/kata-ipu-rootfs" not in Path("/proc/mounts").read_text()
    assert json.loads((bundle / "config.json").read_text())["root"]["path"] == "rootfs"
    assert not list((world.work / "rt-state").glob("*.json"))


def test_wrapper_failure_is_a_json_error_line_in_the_log(world: World, tmp_path: Path) -> None:
    root, log = tmp_path / "root", tmp_path / "log.json"
    bundle = _bundle(world, tmp_path, ["true"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"]["io.katacontainers.ipu.image"] = world.missing
    (bundle / "config.json").write_text(json.dumps(spec))
    rc = _create(WRAPPER, world, root, log, bundle, tmp_path / "pid", "bad1")
    assert rc == 1
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "error" and f"Prepare of {world.missing}" in last["msg"]
    assert "time" in last
    assert "kata-ipu-runtime:" in (tmp_path / "create.err").read_text()
    assert world.volumes() == [] and str(bundle) not in Path("/proc/mounts").read_text()


def test_runc_failure_passes_its_exit_code_and_undoes_the_rootfs(world: World,
                                                                 tmp_path: Path) -> None:
    root, log = tmp_path / "root", tmp_path / "log.json"
    bundle = _bundle(world, tmp_path, ["/no/such/binary"])
    plain = _create("runc", world, root, log, bundle, tmp_path / "pid", "fail1")
    wrapped = _create(WRAPPER, world, root, log, bundle, tmp_path / "pid", "fail2")
    assert plain == wrapped != 0
    # what the runc shim reports: the last line with level "error" (getLastRuntimeError)
    errors = [e for e in map(json.loads, log.read_text().splitlines()) if e["level"] == "error"]
    assert "/no/such/binary" in errors[-1]["msg"]
    assert world.volumes() == []
    assert f"{bundle}/kata-ipu-rootfs" not in Path("/proc/mounts").read_text()
    assert json.loads((bundle / "config.json").read_text())["root"]["path"] == "rootfs"
    for cid in ("fail1", "fail2"):
        _run("runc", world, "--root", str(root), "delete", "--force", cid)
