"""The two launchers of containerd-shim-kata-ipu-v2 (Python: shim_hooks.launcher; native:
shim_hooks/native/launcher.c) against one stand-in server written from the protocol's
decoder (shim_hooks.handoff), and their fall-back to the in-process shim.

The stand-in plays kata-ipu-shimd's part exactly as far as the launcher can see: it receives
the message and three descriptors, reads the options from the launcher's stdin, writes an
address on its stdout, closes them and replies with a status.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ipu.testing.prereq import require_programs
from shim_hooks import handoff

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["-namespace", "k8s.io", "-address", "/run/c/containerd.sock", "-id", "c1"]


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The native launcher, built with a recording stand-in as its Python shim."""
    require_programs("cc")
    work = tmp_path_factory.mktemp("native")
    stub = work / "python-shim"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$0" "$@" > "$PWD/fallback.txt"\nexit 5\n')
    stub.chmod(0o755)
    out = work / "containerd-shim-kata-ipu-v2"
    subprocess.run([str(ROOT / "scripts" / "build-launcher"), str(out), str(stub)], check=True,
                   capture_output=True, timeout=120)
    return str(out), stub


class StandIn:
    """A one-connection-at-a-time stand-in for kata-ipu-shimd."""

    def __init__(self, path: Path, status: bytes | None) -> None:
        self.path = path
        self.status = status
        self.requests: list[handoff.Request] = []
        self.options: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data, anc, _flags, _ = conn.recvmsg(handoff.MAX_MESSAGE,
                                                    socket.CMSG_SPACE(12))
                fds = list(struct.unpack("3i", anc[0][2]))
                self.requests.append(handoff.decode(data))
                with os.fdopen(fds[0], "rb") as stdin:
                    self.options.append(stdin.read())
                os.write(fds[1], b"unix:///run/kata-ipu/shim/p.sock")
                for fd in fds[1:]:
                    os.close(fd)
                if self.status is not None:
                    conn.send(self.status)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def _launchers(native: tuple[str, Path]) -> dict[str, list[str]]:
    return {"python": [sys.executable, "-m", "shim_hooks.launcher"], "native": [native[0]]}


@pytest.fixture(params=["python", "native"])
def launcher(request: pytest.FixtureRequest, native: tuple[str, Path]) -> list[str]:
    return _launchers(native)[request.param]


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandIn]:
    s = StandIn(tmp_path / "shimd.sock", b"0")
    yield s
    s.close()


def _env(server: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KATA_IPU_")}
    return {**env, "KATA_IPU_SHIM_SERVER": server, "MARKER": "from-containerd"}


@pytest.mark.parametrize("action", ["start", "delete"])
def test_start_and_delete_are_handed_to_the_server_with_argv_env_cwd_and_stdio(
        launcher: list[str], standin: StandIn, tmp_path: Path, action: str) -> None:
    out = subprocess.run([*launcher, *FLAGS, action], input=b"OPTIONS", cwd=tmp_path,
                         env=_env(str(standin.path)), capture_output=True, timeout=60,
                         check=False)
    assert (out.returncode, out.stdout, out.stderr) == (
        0, b"unix:///run/kata-ipu/shim/p.sock", b"")
    (req,) = standin.requests
    assert req.argv[1:] == [*FLAGS, action]
    assert req.env["MARKER"] == "from-containerd"
    assert req.env["KATA_IPU_SHIM_SERVER"] == str(standin.path)
    assert req.cwd == str(tmp_path)
    assert standin.options == [b"OPTIONS"]


@pytest.mark.parametrize(("reply", "code", "message"), [
    (b"7", 7, b""), (None, 1, b"did not finish the start")])
def test_the_servers_status_is_the_exit_code(launcher: list[str], tmp_path: Path,
                                             reply: bytes | None, code: int,
                                             message: bytes) -> None:
    server = StandIn(tmp_path / "s.sock", reply)
    try:
        out = subprocess.run([*launcher, *FLAGS, "start"], input=b"", cwd=tmp_path,
                             env=_env(str(server.path)), capture_output=True, timeout=60,
                             check=False)
    finally:
        server.close()
    assert out.returncode == code
    assert message in out.stderr


@pytest.mark.parametrize(("server", "action"), [
    ("missing", "start"),  # nobody listens: run the shim in-process
    ("missing", "delete"),
    ("", "start"),  # hand-off turned off
    ("standin", "-v"),  # only start and delete are handed off
])
def test_native_launcher_runs_the_python_shim_otherwise(
        native: tuple[str, Path], standin: StandIn, tmp_path: Path, server: str,
        action: str) -> None:
    binary, stub = native
    path = {"missing": str(tmp_path / "nobody.sock"), "": "",
            "standin": str(standin.path)}[server]
    out = subprocess.run([binary, *FLAGS, action], cwd=tmp_path, env=_env(path),
                         capture_output=True, timeout=60, check=False)
    assert out.returncode == 5, out.stderr  # the stand-in Python shim's
    assert (tmp_path / "fallback.txt").read_text().split("\n")[:-1] == [str(stub), *FLAGS,
                                                                         action]
    assert standin.requests == []


def test_python_launcher_runs_the_shim_in_process_without_a_server(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "shim_hooks.launcher", *FLAGS, "start"],
                         input=b"", cwd=tmp_path, env={
                             **_env(str(tmp_path / "nobody.sock")),
                             "KATA_IPU_SHIM_CONFIG": str(tmp_path / "missing.toml")},
                         capture_output=True, timeout=60, check=False)
    # the in-process shim ran: it read its config (and named the missing file)
    assert out.returncode == 1
    assert b"missing.toml: shim config file not found" in out.stderr
