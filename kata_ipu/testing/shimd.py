"""Run a real ``kata-ipu-shimd`` for tests and benchmarks, on a private socket.

The server reads the shims' configuration from its environment (``env``: the same
``KATA_IPU_SHIM_CONFIG``/``KATA_IPU_ADDRESS`` containerd passes the shims, as on a host where
both read /etc/kata-ipu/shim.toml); containerd's shims find it through
``KATA_IPU_SHIM_SERVER`` = :attr:`ShimServer.socket`. :meth:`ShimServer.stop` stops it (its
children that became proxies of running containers live on, as on a host).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Self

SERVER = str(Path(sys.executable).with_name("kata-ipu-shimd"))


class ShimServer:
    def __init__(self, work: Path, env: Mapping[str, str] | None = None, *,
                 log_level: str = "debug") -> None:
        self.socket = work / "shimd.sock"
        self.log = work / "shimd.log"
        self.env = dict(env or {})
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, env: Mapping[str, str] | None = None,
              preexec: Callable[[], None] | None = None, timeout: float = 30) -> Self:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SERVER, "--socket", str(self.socket), "--log-level", self.log_level, *extra],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, **(env or {})},
                preexec_fn=preexec)  # noqa: PLW1509 - only the main thread forks here
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"kata-ipu-shimd did not start: {text}")
            time.sleep(0.05)
        return self

    def serving(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
            return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[int]:
        return [int(p) for p in Path(f"/proc/{self.pid}/task/{self.pid}/children")
                .read_text().split()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
