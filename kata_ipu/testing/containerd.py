"""A real containerd (Debian's 1.6) for tests: private socket, root, state dir and namespace.

:class:`Containerd` writes a generated ``config.toml`` under ``workdir`` (CRI off unless asked
for; extra TOML appended, e.g. a runtime-handler snippet), puts ``bin_dirs`` (the venv's bin
with ``containerd-shim-kata-ipu-v2`` and ``kata-ipu-runtime``) first on containerd's ``PATH`` so
its shim lookup finds them, and passes ``env`` (``KATA_IPU_ADDRESS``...) on to every shim.
:meth:`Containerd.ctr` runs ``ctr`` against it. :meth:`Containerd.teardown` kills and deletes
every task and container it ran, stops containerd, unmounts whatever is still mounted under its
directories and removes them: nothing is left behind, even after a failed test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from kata_ipu.osutil.mountinfo import mounts_under


class Containerd:
    def __init__(self, workdir: Path, *, env: Mapping[str, str] | None = None,
                 bin_dirs: Sequence[str] = (), extra_config: str = "", cri: bool = False,
                 namespace: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.socket = workdir / "containerd.sock"
        self.config = workdir / "config.toml"
        self.log = workdir / "containerd.log"
        self.namespace = namespace or f"kipu-{uuid.uuid4().hex[:8]}"
        self.env = dict(env or {})
        self.bin_dirs = list(bin_dirs) or [str(Path(sys.executable).parent)]
        disabled = [] if cri else ['"io.containerd.grpc.v1.cri"']
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.root}"\nstate = "{self.state}"\n'
            f"disabled_plugins = [{', '.join(disabled)}]\n"
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            '[debug]\n  level = "info"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{workdir}/opt"\n'
            + extra_config)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def process_env(self) -> dict[str, str]:
        path = os.pathsep.join([*self.bin_dirs, os.environ.get("PATH", os.defpath)])
        return dict(os.environ, PATH=path, **self.env)

    def start(self, timeout: float = 30) -> Containerd:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env=self.process_env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}: "
                                   f"{self.log.read_text()[-3000:]}")
            if self.socket.exists() and self.ctr("version", check=False,
                                                 timeout=10).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.teardown()
                raise TimeoutError(f"containerd not ready after {timeout}s")
            time.sleep(0.05)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120,
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "--address", str(self.socket), "--namespace",
                namespace or self.namespace, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             env=self.process_env, check=False)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
        return res

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cleanup_namespace(self, namespace: str | None = None) -> None:
        """Kill and delete every task, then every container, of a namespace."""
        tasks = self.ctr("task", "ls", "-q", check=False, namespace=namespace).stdout.split()
        for task in tasks:
            self.ctr("task", "kill", "-s", "SIGKILL", task, check=False, namespace=namespace)
        for task in tasks:
            for _ in range(50):
                if self.ctr("task", "delete", "-f", task, check=False, timeout=30,
                            namespace=namespace).returncode == 0:
                    break
                if task not in self.ctr("task", "ls", "-q", check=False,
                                        namespace=namespace).stdout.split():
                    break
                time.sleep(0.1)
        for cont in self.ctr("container", "ls", "-q", check=False,
                             namespace=namespace).stdout.split():
            self.ctr("container", "rm", cont, check=False, namespace=namespace)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def teardown(self) -> None:
        namespaces = {self.namespace}
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                namespaces.update(self.ctr("namespaces", "ls", "-q", check=False).stdout.split())
                for ns in namespaces:
                    self.cleanup_namespace(ns)
        self.stop()
        for ns in namespaces:  # the runc shim's per-namespace runc root, empty by now
            with contextlib.suppress(OSError):
                os.rmdir(f"/run/containerd/runc/{ns}")
        for base in (self.state, self.root):
            for point in mounts_under(base):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        for d in (self.state, self.root, self.workdir / "opt"):
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.teardown()
