"""Run a real ``kata-ipu-snapshotter`` for tests, in a private directory.

Started as its console script with a config file under ``workdir`` (root, socket, IPU
address); readiness is awaited the way systemd does it (``READY=1`` on ``$NOTIFY_SOCKET``).
:meth:`SnapshotterProcess.proxy_plugin_toml` is the containerd snippet that uses it.
:meth:`SnapshotterProcess.teardown` stops it and unmounts whatever is still mounted under
its root (its lowers), so nothing is left behind even after a failed test; the IPU's clones
go with the IPU's own teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from kata_ipu.block.fsutil import mounts_under


class SnapshotterProcess:
    def __init__(self, workdir: Path, *, ipu_address: str = "", name: str = "ipu",
                 extra_config: str = "", instance: str = "test") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.root = workdir / "root"
        self.socket = workdir / "snapshotter.sock"
        self.name = name
        self.config = workdir / "snapshotter.toml"
        self.log = workdir / "snapshotter.log"
        self.config.write_text(
            f'root = "{self.root}"\naddress = "{self.socket}"\nipu_address = "{ipu_address}"\n'
            f'instance = "{instance}"\n' + extra_config)
        self.proc: subprocess.Popen[bytes] | None = None

    def proxy_plugin_toml(self) -> str:
        return (f'[proxy_plugins.{self.name}]\n  type = "snapshot"\n'
                f'  address = "{self.socket}"\n')

    def start(self, timeout: float = 30) -> Self:
        notify_path = str(self.workdir / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.2)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        env.pop("KATA_IPU_ADDRESS", None)  # the config file says which IPU
        exe = Path(sys.executable).with_name("kata-ipu-snapshotter")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(exe), "--config", str(self.config),
                                          "--log-level", "debug"],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if b"READY=1" in notify.recv(4096):
                        return self
                except TimeoutError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kata-ipu-snapshotter exited with "
                                       f"{self.proc.returncode}: {self.log_text()[-2000:]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"kata-ipu-snapshotter not ready after {timeout}s")
        finally:
            notify.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def mounts(self) -> list[str]:
        """Mount points under the snapshotter's root (its lowers), deepest first."""
        return mounts_under(self.root)

    def lower_info(self, mountpoint: str) -> dict[str, object]:
        """What ``lower.json`` beside a lower's mount point says (image, layers)."""
        data: dict[str, object] = json.loads((Path(mountpoint).parent / "lower.json")
                                             .read_text())
        return data

    def teardown(self) -> None:
        self.stop()
        for mountpoint in mounts_under(self.root):
            subprocess.run(["umount", "--lazy", mountpoint], check=False, capture_output=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.teardown()
