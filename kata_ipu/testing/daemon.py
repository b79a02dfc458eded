"""Run a real ``kata-ipud`` process for tests, in a private directory.

The daemon is started as its console script with a config file under ``workdir``; readiness
is awaited the way systemd does it (a ``$NOTIFY_SOCKET`` datagram with ``READY=1``).
:meth:`IpuDaemon.teardown` stops it and destroys the block pool, so no mount, loop device or
qemu-storage-daemon is left behind.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kata_ipu.block import loop
from kata_ipu.block.pool import open_pool
from kata_ipu.testing.notified import NotifiedProcess
from kata_ipu.testing.registry import free_port


class IpuDaemon(NotifiedProcess):
    name = "kata-ipud"

    def __init__(self, workdir: Path, *, backend: str = "file", pool_size: str = "4G",
                 insecure_registries: tuple[str, ...] = (), metrics: bool = True,
                 tcp: str | None = None, token_file: Path | None = None,
                 unix: bool = True, extra_config: str = "") -> None:
        super().__init__(workdir, workdir / "ipud.log")
        workdir.mkdir(parents=True, exist_ok=True)
        self.root = workdir / "root"
        self.socket = workdir / "ipud.sock"
        self.address = f"unix://{self.socket}"
        self.metrics_port = free_port() if metrics else None
        self.config = workdir / "ipud.toml"
        insecure = ", ".join(f'"{r}"' for r in insecure_registries)
        addresses = ([self.address] if unix else []) + ([f"tcp://{tcp}"] if tcp else [])
        if tcp and not unix:
            self.address = f"tcp://{tcp}"
        listen = ", ".join(f'"{a}"' for a in addresses)
        self.config.write_text(
            f'root = "{self.root}"\naddresses = [{listen}]\nsocket_mode = "0600"\n'
            f'[block]\nbackend = "{backend}"\npool_size = "{pool_size}"\n'
            f'[image]\ninsecure_registries = [{insecure}]\nhosts_dir = "{workdir}/certs.d"\n'
            + (f'[metrics]\naddress = "127.0.0.1:{self.metrics_port}"\n' if metrics else "")
            + (f'[tcp]\ntoken_file = "{token_file}"\n' if token_file else "")
            + extra_config)

    def start(self, timeout: float = 60, *, env: dict[str, str] | None = None,
              wrapper: tuple[str, ...] = ()) -> IpuDaemon:
        exe = Path(sys.executable).with_name("kata-ipud")
        self.spawn([*wrapper, str(exe), "--config", str(self.config)], env=env,
                   timeout=timeout)
        return self

    def cli(self, *args: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the ``kata-ipu`` CLI against this daemon."""
        return subprocess.run([str(Path(sys.executable).with_name("kata-ipu")), "--address",
                               self.address, *args], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def volume_loops(self) -> list[str]:
        """Loop devices whose backing file is a volume in this daemon's pool (the kernel's
        view, from sysfs); the pool's own loop-mounted image is not counted."""
        return [Path(dev).name for dev in loops_under(self.root / "block" / "data")]

    def metrics_text(self) -> str:
        assert self.metrics_port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as resp:
            text: str = resp.read().decode()
            return text

    def teardown(self) -> None:
        """Stop the daemon and remove every kernel object and file its pool holds."""
        self.stop()
        block = self.root / "block"
        if (block / "pool.json").exists():
            target = open_pool(block)
            target.destroy_pool(force=True)


def loops_under(path: Path) -> dict[str, str]:
    """``/dev/loopN`` -> backing file, for every loop device serving a file under ``path``
    (the kernel's view, from sysfs)."""
    return {f"/dev/loop{minor}": served for minor, served in loop.find_under(path)}


@contextlib.contextmanager
def running(workdir: Path, **options: Any) -> Iterator[IpuDaemon]:
    """A started :class:`IpuDaemon` (``options`` as its constructor's); afterwards it is torn
    down and nothing of it may be left: no loop device or mount under ``workdir``."""
    daemon = IpuDaemon(workdir, **options)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.teardown()
        assert not loops_under(workdir), "loop devices leaked"
        assert str(workdir) not in Path("/proc/mounts").read_text(), "mounts leaked"
