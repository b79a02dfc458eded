"""Run a real ``kata-ipu-snapshotter`` for tests, in a private directory.

Started as its console script with a config file under ``workdir`` (root, socket, IPU
address); readiness is awaited the way systemd does it (``READY=1`` on ``$NOTIFY_SOCKET``).
:meth:`SnapshotterProcess.proxy_plugin_toml` is the containerd snippet that uses it.
:meth:`SnapshotterProcess.teardown` stops it and unmounts whatever is still mounted under
its root (its lowers), so nothing is left behind even after a failed test; the IPU's clones
go with the IPU's own teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Self

from kata_ipu.osutil.mountinfo import mounts_under
from kata_ipu.testing.notified import NotifiedProcess


class SnapshotterProcess(NotifiedProcess):
    name = "kata-ipu-snapshotter"

    def __init__(self, workdir: Path, *, ipu_address: str = "", plugin: str = "ipu",
                 extra_config: str = "", instance: str = "test",
                 lower_linger: float = 0, log_level: str = "debug") -> None:
        super().__init__(workdir, workdir / "snapshotter.log")
        workdir.mkdir(parents=True, exist_ok=True)
        self.root = workdir / "root"
        self.socket = workdir / "snapshotter.sock"
        self.plugin = plugin  # containerd's name for it: [proxy_plugins.<plugin>]
        self.config = workdir / "snapshotter.toml"
        self.config.write_text(
            f'root = "{self.root}"\naddress = "{self.socket}"\nipu_address = "{ipu_address}"\n'
            f'instance = "{instance}"\nlower_linger = {lower_linger}\n' + extra_config)
        self.log_level = log_level

    def proxy_plugin_toml(self) -> str:
        return (f'[proxy_plugins.{self.plugin}]\n  type = "snapshot"\n'
                f'  address = "{self.socket}"\n')

    def start(self, timeout: float = 30) -> Self:
        env = dict(os.environ)
        env.pop("KATA_IPU_ADDRESS", None)  # the config file says which IPU
        exe = Path(sys.executable).with_name("kata-ipu-snapshotter")
        self.spawn([str(exe), "--config", str(self.config), "--log-level", self.log_level],
                   env=env, timeout=timeout)
        return self

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
