"""qemu-storage-daemon processes and a thread-safe synchronous QMP link (``qemu.qmp``).

Daemons are started with ``--daemonize`` (the parent exits once exports and monitors are set
up, so the socket exists when :func:`spawn` returns) and ``--pidfile``; they outlive the
process that started them, as a long-lived storage daemon should. A daemon is identified by its
pid file *and* a marker string in its command line, so a recycled pid is never signalled.

:class:`QmpLink` runs a :class:`qemu.qmp.QMPClient` on a private event-loop thread, so the
synchronous block API can be called from any thread while QMP stays asyncio-native.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError, Runstate
from qemu.qmp.qmp_client import ExecuteError

from kata_ipu.block.errors import DaemonUnavailable
from kata_ipu.executor import DEFAULT, Executor

log = logging.getLogger("kata_ipu.block")

PROGRAM = "qemu-storage-daemon"


def read_pid(pidfile: Path, marker: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and its command line has ``marker``."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return None
    return pid if marker.encode() in cmdline else None


def spawn(args: Sequence[str], pidfile: Path, executor: Executor = DEFAULT,
          timeout: float = 30.0) -> int:
    """Start a daemonized qemu-storage-daemon; returns its pid once it is serving."""
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    executor.run([PROGRAM, *args, "--pidfile", str(pidfile), "--daemonize"], timeout=timeout)
    pid = int(pidfile.read_text().strip())
    log.debug("qemu-storage-daemon started", extra={"pid": pid, "pidfile": str(pidfile)})
    return pid


def stop(pidfile: Path, marker: str, timeout: float = 10.0) -> bool:
    """SIGTERM the daemon (it unmounts FUSE exports and closes sockets), SIGKILL after
    ``timeout``; True if a daemon was running. Tolerates one that is already gone."""
    pid = read_pid(pidfile, marker)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while read_pid(pidfile, marker) == pid:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.005)
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    return True


class QmpLink:
    """A synchronous, thread-safe handle on one QMP monitor socket."""

    def __init__(self, socket_path: Path, name: str = "kata-ipu-qsd") -> None:
        self.socket_path = socket_path
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}",
                                        daemon=True)
        self._thread.start()
        self._client: QMPClient | None = None

    def _submit(self, coro: Any, timeout: float) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError as exc:
            fut.cancel()
            raise DaemonUnavailable(f"QMP call timed out after {timeout:g}s") from exc

    def connect(self, timeout: float = 10.0) -> None:
        async def _connect() -> QMPClient:
            client = QMPClient(self.name)
            await client.connect(str(self.socket_path))
            return client

        self.disconnect()
        try:
            self._client = self._submit(_connect(), timeout)
        except QMPError as exc:
            raise DaemonUnavailable(f"cannot connect to {self.socket_path}") from exc

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 30.0) -> Any:
        client = self._client
        if client is None or not self.connected:
            raise DaemonUnavailable("not connected")
        log.debug("qmp -->", extra={"command": command, "arguments": arguments})
        try:
            return self._submit(client.execute(command, arguments), timeout)
        except ExecuteError:
            raise
        except QMPError as exc:
            raise DaemonUnavailable(f"QMP {command} failed") from exc

    def execute_wait_event(self, command: str, arguments: dict[str, Any] | None, event: str,
                           match: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Run ``command`` and wait for the first ``event`` whose data contains ``match``
        (a scoped listener registered before the command is sent, so none is missed)."""
        client = self._client
        if client is None or not self.connected:
            raise DaemonUnavailable("not connected")

        async def _run() -> dict[str, Any]:
            with client.listener(event) as listener:
                await client.execute(command, arguments)
                async for ev in listener:
                    data = dict(ev).get("data", {})
                    if isinstance(data, dict) and all(data.get(k) == v for k, v in match.items()):
                        return dict(ev)
            raise DaemonUnavailable(f"event stream ended before {event}")

        async def _bounded() -> dict[str, Any]:
            return await asyncio.wait_for(_run(), timeout)

        return dict(self._submit(_bounded(), timeout + 5.0))

    def disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                self._submit(client.disconnect(), 5.0)

    def close(self) -> None:
        self.disconnect()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        if not self._loop.is_running():
            self._loop.close()
