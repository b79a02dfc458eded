"""A daemon of this project run for tests the way systemd runs its ``Type=notify`` units.

:class:`NotifiedProcess` spawns the console script with ``$NOTIFY_SOCKET`` pointing at a
datagram socket in its work directory and waits for ``READY=1`` (sent once the daemon's
recovery is done and it listens), or for its exit; :meth:`NotifiedProcess.stop` sends
SIGTERM (or the given signal) and kills what does not exit in time. Subclasses say what to
run: kata-ipud (:mod:`kata_ipu.testing.daemon`), kata-ipu-snapshotter
(:mod:`kata_ipu.testing.snapshotter`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class NotifiedProcess:
    name = "daemon"

    def __init__(self, workdir: Path, log: Path) -> None:
        self.workdir = workdir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              timeout: float = 60) -> None:
        notify_path = str(self.workdir / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.2)
        full_env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": notify_path}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                         env=full_env)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if b"READY=1" in notify.recv(4096):
                        return
                except TimeoutError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                       f"{self.log_text()[-2000:]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{self.name} not ready after {timeout}s")
        finally:
            notify.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 120) -> int:
        """Wait for a daemon that is expected to die on its own (crash points)."""
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
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
