"""The shim binary's start/delete actions: argv and stdin to the chosen delegate, stdout rules.

Kata cannot run here, so the delegate is a recording stand-in that fails like a shim without a
VM would; what is checked is what the proxy passes on and what it prints (nothing on stdout
from a failed ``start``, a binary DeleteResponse from ``delete``). The runc delegate runs for
real in tests/root/test_shim_containerd.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim_hooks import shim
from shim_hooks.config import ShimConfig
from shim_hooks.taskapi import DeleteResponse

SHIM = str(Path(sys.executable).with_name("containerd-shim-kata-ipu-v2"))
FLAGS = ["-namespace", "k8s.io", "-address", "/run/c/containerd.sock", "-publish-binary",
         "/usr/bin/containerd", "-id", "c1"]


def _stub(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    record = 'printf "%s\\n" "$(basename $0)" "$@" > "$PWD/argv.txt"; cat > "$PWD/stdin.bin"\n'
    kata = _stub(tmp_path / "containerd-shim-kata-v2",
                 record + 'echo "kata: no hypervisor"; exit 3\n')
    runc = _stub(tmp_path / "containerd-shim-runc-v2", record + 'echo "runc: nope"; exit 4\n')
    cfg = tmp_path / "shim.toml"
    cfg.write_text(f'socket_dir = "{tmp_path}/s"\n[delegates]\nkata = "{kata}"\n'
                   f'runc = "{runc}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KATA_IPU_")}
    env["KATA_IPU_SHIM_CONFIG"] = str(cfg)
    env["KATA_IPU_SHIM_SERVER"] = ""  # in-process start (test_shim_launcher has the hand-off)
    return bundle, env


def _any(type_url: str, value: bytes) -> bytes:
    return (bytes([0x0A, len(type_url)]) + type_url.encode() + bytes([0x12, len(value)]) +
            value)


RUNC_OPTS = _any("containerd.runc.v1.Options", b"\x08\x01")  # no_pivot_root
KATA_CFG = b"\x12\x20/etc/kata/configuration-ipu.toml"
CRI_RUNC = _any("runtimeoptions.v1.Options", b"\x0a\x15io.containerd.runc.v2" + KATA_CFG)
CRI_KATA = _any("runtimeoptions.v1.Options", KATA_CFG)


@pytest.mark.parametrize(("env_delegate", "options", "name", "code", "forwarded"), [
    (None, b"", "containerd-shim-kata-v2", 3, b""),  # the default
    (None, CRI_KATA, "containerd-shim-kata-v2", 3, CRI_KATA),  # ConfigPath reaches Kata
    ("runc", b"", "containerd-shim-runc-v2", 4, b""),  # $KATA_IPU_DELEGATE
    ("kata", RUNC_OPTS, "containerd-shim-runc-v2", 4, RUNC_OPTS),  # runc options win
    ("kata", CRI_RUNC, "containerd-shim-runc-v2", 4, b""),  # handler TypeUrl; runc gets none
])
def test_start_runs_the_chosen_delegate_with_containerds_argv_and_stdin(
        setup: tuple[Path, dict[str, str]], env_delegate: str | None, options: bytes,
        name: str, code: int, forwarded: bytes) -> None:
    bundle, env = setup
    if env_delegate:
        env["KATA_IPU_DELEGATE"] = env_delegate
    out = subprocess.run([SHIM, *FLAGS, "-debug", "start"], input=options, cwd=bundle,
                         capture_output=True, env=env, timeout=60, check=False)
    assert out.returncode == 1
    assert out.stdout == b""  # containerd would take anything here for the address
    assert f"start failed (exit {code})" in out.stderr.decode()
    assert (bundle / "argv.txt").read_text().split("\n")[:-1] == [name, *FLAGS, "-debug",
                                                                  "start"]
    assert (bundle / "stdin.bin").read_bytes() == forwarded


def test_start_fails_clearly_when_the_kata_shim_is_not_installed(
        setup: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bundle, env = setup
    (tmp_path / "shim.toml").write_text("")
    env["PATH"] = "/nonexistent"
    out = subprocess.run([SHIM, *FLAGS, "start"], cwd=bundle, capture_output=True, env=env,
                         input=b"", timeout=60, check=False)
    assert (out.returncode, out.stdout) == (1, b"")
    assert b"containerd-shim-kata-v2: not found in $PATH" in out.stderr


def test_delete_passes_the_delegates_reply_or_makes_its_own(
        setup: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bundle, env = setup
    env["KATA_IPU_DELEGATE"] = "runc"
    reply = DeleteResponse(pid=7, exit_status=0, exited_seconds=1700000000).encode()
    (tmp_path / "reply.bin").write_bytes(reply)
    _stub(tmp_path / "containerd-shim-runc-v2",
          f'echo "$@" > "$PWD/argv.txt"; cat "{tmp_path}/reply.bin"\n')
    argv = [SHIM, *FLAGS, "-bundle", str(bundle), "delete"]
    out = subprocess.run(argv, cwd=bundle, capture_output=True, env=env, timeout=60,
                         check=False)
    assert out.returncode == 0 and out.stdout == reply
    assert (bundle / "argv.txt").read_text().split() == [*FLAGS, "-bundle", str(bundle),
                                                         "delete"]
    _stub(tmp_path / "containerd-shim-runc-v2", "exit 1\n")
    out = subprocess.run(argv, cwd=bundle, capture_output=True, env=env, timeout=60,
                         check=False)
    assert out.returncode == 0
    resp = DeleteResponse.decode(out.stdout)
    assert resp.exit_status == 137 and resp.exited_seconds > 1700000000


def test_go_style_flags_and_a_missing_action() -> None:
    args = shim.build_parser().parse_args(["-namespace=ns", "-id", "x", "-debug", "start"])
    assert (args.namespace, args.id, args.debug, args.action) == ("ns", "x", True, "start")
    assert shim.delegate_argv("/bin/d", args, "delete") == [
        "/bin/d", "-namespace", "ns", "-id", "x", "-debug", "delete"]
    out = subprocess.run([SHIM, "-id", "x"], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "action is required" in out.stderr


def _delegate(tmp_path: Path, script: str) -> shim.Delegate:
    proc = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return shim.Delegate(proc, "stand-in", ShimConfig(), tmp_path, time.monotonic())


def test_the_delegates_start_is_read_on_the_loop_until_it_exits(tmp_path: Path) -> None:
    """The address is what the delegate's start printed, its status is its exit status, and
    its end is its exit, not the end of its output: the runc shim's own start leaves a daemon
    behind, and a delegate whose daemon kept the pipe open must not hang the start (here: for
    the 30 s of a background sleep), nor must output larger than a pipe's buffer."""
    async def run(script: str) -> tuple[tuple[str, int], float]:
        t0 = time.monotonic()
        out = await shim.delegate_output_async(_delegate(tmp_path, script))
        return out, time.monotonic() - t0

    (out, rc), _ = asyncio.run(run("echo unix:///run/s.sock"))
    assert (out, rc) == ("unix:///run/s.sock", 0)
    (out, rc), took = asyncio.run(run("echo unix:///run/d.sock; sleep 30 & exit 0"))
    assert (out, rc) == ("unix:///run/d.sock", 0)
    assert took < 15, f"waited {took:.1f} s for the daemon's end of the pipe"
    (out, rc), _ = asyncio.run(run("head -c 200000 /dev/zero | tr '\\0' x; echo; exit 5"))
    assert (len(out), rc) == (200000, 5)
    with pytest.raises(shim.ShimError, match=r"start failed \(exit 5\)"):
        shim.delegate_started(_delegate(tmp_path, "exit 5"), "boom", 5)
