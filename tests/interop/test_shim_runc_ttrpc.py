"""The Python ttrpc client against containerd's real runc shim (Debian's containerd 1.6).

``containerd-shim-runc-v2`` is started the way containerd starts it (``... -id ID start`` in
the bundle directory, address printed on stdout), then the Task API is called over the shim's
ttrpc socket with hand-encoded requests and the real answers are decoded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kata_ipu import errors
from kata_ipu.testing.prereq import require_programs, require_root
from kata_ipu.ttrpc import NAMESPACE_KEY, Client, Metadata
from kata_ipu.ttrpc.wire import iter_fields

TASK = "containerd.task.v2.Task"


def _str_field(number: int, value: str) -> bytes:
    data = value.encode()
    return bytes([(number << 3) | 2, len(data)]) + data


@dataclass
class Shim:
    id: str
    address: str
    bundle: Path
    metadata: Metadata


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
        f"/proc/{pid}/status").read_text().lower()


def _shim_pids(bundle: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(proc / "cwd") == str(bundle) and "containerd-shim" in os.readlink(
                    proc / "exe"):
                pids.append(int(proc.name))
    return pids


@pytest.fixture
def runc_shim(tmp_path: Path) -> Iterator[Shim]:
    require_root()
    require_programs("containerd-shim-runc-v2", "runc")
    shim_id = f"kipu-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    # The daemonized shim logs to the FIFO ./log and exits silently without a reader.
    os.mkfifo(bundle / "log")
    log_fd = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            with contextlib.suppress(BlockingIOError):
                os.read(log_fd, 65536)
            time.sleep(0.05)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    containerd_sock = str(tmp_path / "containerd.sock")
    env = dict(os.environ, TTRPC_ADDRESS=containerd_sock + ".ttrpc", GOMAXPROCS="2")
    out = subprocess.run(
        ["containerd-shim-runc-v2", "-namespace", "kipu-test", "-address", containerd_sock,
         "-publish-binary", "/usr/bin/containerd", "-id", shim_id, "start"],
        cwd=bundle, env=env, capture_output=True, text=True, timeout=30, check=True,
    )
    address = out.stdout.strip()
    try:
        yield Shim(shim_id, address, bundle, Metadata([(NAMESPACE_KEY, "kipu-test")]))
    finally:
        for pid in _shim_pids(bundle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.removeprefix("unix://"))
        stop.set()
        drainer.join()
        os.close(log_fd)


async def test_connect_state_shutdown_on_real_runc_shim(runc_shim: Shim) -> None:
    assert runc_shim.address.startswith("unix:///run/containerd/s/")
    sock = runc_shim.address.removeprefix("unix://")
    assert (os.stat(sock).st_mode & 0o777) == 0o600

    async with await Client.connect(runc_shim.address) as client:
        # Connect{id} -> ConnectResponse{shim_pid=1, task_pid=2, version=3}
        reply = await client.call(TASK, "Connect", _str_field(1, runc_shim.id),
                                  timeout=10, metadata=runc_shim.metadata)
        fields = {n: v for n, _wt, v in iter_fields(reply)}
        shim_pid = fields[1]
        assert isinstance(shim_pid, int)
        assert shim_pid in _shim_pids(runc_shim.bundle), "ConnectResponse.shim_pid is not the shim"

        # State of a container that was never created: NOT_FOUND with containerd's wording.
        with pytest.raises(errors.NotFound, match="container not created"):
            await client.call(TASK, "State", _str_field(1, runc_shim.id), timeout=10,
                              metadata=runc_shim.metadata)

        with pytest.raises(errors.Unimplemented, match=r"^method Nope$"):
            await client.call(TASK, "Nope", b"", timeout=10)

        # Shutdown{id}: an empty success, then the shim daemon exits.
        assert await client.call(TASK, "Shutdown", _str_field(1, runc_shim.id), timeout=10,
                                 metadata=runc_shim.metadata) == b""
    deadline = time.monotonic() + 10
    while _pid_alive(shim_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(shim_pid), "shim did not exit after Shutdown"
