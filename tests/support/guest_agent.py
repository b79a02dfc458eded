"""A test agent for the VM tests: the subset of Kata's agent (``grpc.AgentService``) that a
block-device rootfs needs, served with this project's ttrpc over a virtio-serial port.

It runs as PID 1 of the test guest (Debian's python3; stdlib + pyudev + the copied
``kata_ipu.ttrpc``). It lives in ``tests.support`` (not shipped) rather than ``guest_hooks``
because it is a stand-in for Kata's agent used by tests, not product code, and it needs
``kata_ipu.ttrpc``, which ``guest_hooks`` (stdlib + pyudev only) must not import.

* ``CreateContainer``: for each ``Storage{driver:"blk", source:<PCI path>, fstype,
  mount_point}`` wait for the disk (uevents, ``--hotplug-timeout``) and mount it with
  :mod:`guest_hooks`, then write an OCI bundle whose root is ``OCI.Root.Path`` and ``runc
  create`` it (stdout/stderr to a file).
* ``StartContainer`` (``runc start``), ``WaitProcess`` (exit status; the agent is PID 1, so
  the container's init is its child), ``ReadStdout`` (what the process printed; empty at EOF),
  ``RemoveContainer`` (kill if running, ``runc delete``, unmount; works after a surprise
  removal of the disk), ``CopyFile`` (the benchmark's copy-the-rootfs-in baseline).
* ``--guest-hook-path`` (Kata's ``CreateSandbox.guest_hook_path``): executables in
  ``<path>/prestart`` run with the OCI state on stdin after the bundle is written and before
  ``runc create``; ``<path>/poststop`` after ``runc delete``. Deviation: Kata hands them to its
  runtime, which runs prestart hooks inside container creation; runc runs them after it has
  bind-mounted the rootfs, too late to mount the rootfs itself, so the agent runs them at the
  point where Kata mounts its storages. The guest image ships ``python3 -m guest_hooks hook``
  there; it does nothing for containers without ``io.katacontainers.ipu.rootfs.*``.

For the tests, the agent prints its own view on the console: ``AGENT-MOUNTED <cid> <target>
<source> <fstype>`` (from /proc/self/mounts after mounting), ``AGENT-CREATED <cid> <stage
times>``, ``AGENT-REMOVED <cid> mounts-left=<n>``. Every runc call and hook has a timeout.

Errors carry the guest_hooks kind: device-timeout → DEADLINE_EXCEEDED, wrong-fstype and bad
input → INVALID_ARGUMENT, already-mounted → ALREADY_EXISTS, fsck-failed → DATA_LOSS.

Size (~400 lines): one stand-in agent, a method per Kata agent RPC it serves; it is copied
into the guest as one file beside its codec (agentproto.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from guest_hooks.device import Locator, wait_for_disk
from guest_hooks.errors import (
    AlreadyMounted,
    DeviceTimeout,
    FsckFailed,
    GuestHookError,
    InvalidArgument,
    WrongFilesystem,
)
from guest_hooks.mount import Mounted, mount_rootfs, mountpoints, sys_mount, umount_rootfs
from guest_hooks.pcipath import PciPath
from kata_ipu import errors
from kata_ipu.ttrpc import CallContext, Server
from tests.support import agentproto as ap

RUN = "/run/kata-containers"
COMMAND_TIMEOUT = 60.0  # every runc call and hook in the guest
T = TypeVar("T")
PR_SET_CHILD_SUBREAPER = 36


def _to_status(exc: GuestHookError) -> errors.KataIpuError:
    text = f"{exc.kind}: {exc}"
    if isinstance(exc, DeviceTimeout):
        return errors.DeadlineExceeded(text)
    if isinstance(exc, AlreadyMounted):
        return errors.AlreadyExists(text)
    if isinstance(exc, FsckFailed):
        return errors.DataLoss(text)
    if isinstance(exc, WrongFilesystem | InvalidArgument):
        return errors.InvalidArgument(text)
    return errors.Internal(text)


@dataclass
class Container:
    cid: str
    bundle: str
    mounts: list[str]
    pid: int = 0
    exit: asyncio.Future[int] | None = None
    stdout: str = ""
    read_offset: int = 0
    watch: list[str] = field(default_factory=list)  # every mount point made for it
    annotations: dict[str, str] = field(default_factory=dict)


class Agent:
    def __init__(self, hotplug_timeout: float, guest_hook_path: str = "") -> None:
        self.hotplug_timeout = hotplug_timeout
        self.guest_hook_path = guest_hook_path
        self.containers: dict[str, Container] = {}

    async def _run_hooks(self, stage: str, cid: str, status: str, bundle: str,
                         annotations: dict[str, str]) -> None:
        """Kata's ``guest_hook_path``: every executable in ``<path>/<stage>/``, in name order,
        with the OCI state JSON on stdin; a failing hook fails the call with its stderr."""
        if not self.guest_hook_path:
            return
        folder = os.path.join(self.guest_hook_path, stage)
        hooks = _list_dir(folder)
        state = json.dumps({"ociVersion": "1.0.2", "id": cid, "status": status, "pid": 0,
                            "bundle": bundle, "annotations": annotations}).encode()
        for name in hooks:
            proc = await asyncio.create_subprocess_exec(
                os.path.join(folder, name), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _out, err = await _bounded(proc, proc.communicate(state), f"{stage} hook {name}")
            if proc.returncode != 0:
                text = err.decode("utf-8", "replace").strip()
                cls = (errors.DeadlineExceeded if "device-timeout" in text
                       else errors.FailedPrecondition)
                raise cls(f"{stage} hook {name} exited {proc.returncode}: {text}")

    def handlers(self) -> dict[str, Callable[[CallContext, bytes], Awaitable[bytes]]]:
        return {"CreateContainer": self.create, "StartContainer": self.start,
                "WaitProcess": self.wait, "ReadStdout": self.read_stdout,
                "RemoveContainer": self.remove, "CopyFile": self.copy_file}

    def _get(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise errors.NotFound(f"container {cid!r} not found")
        return c

    async def _mount_storage(self, s: ap.Storage, timings: dict[str, float]) -> Mounted:
        if s.driver != "blk":
            raise errors.InvalidArgument(f"unsupported storage driver {s.driver!r}")
        if not s.mount_point.startswith("/"):
            raise errors.InvalidArgument(f"mount_point {s.mount_point!r} is not absolute")
        try:
            started = time.monotonic()
            if s.source.startswith("/dev/"):
                node, ro = s.source, False  # Kata: a /dev path is used as is, no uevent wait
            else:
                locator = Locator(pci_path=PciPath.parse(s.source))
                disk = await asyncio.to_thread(wait_for_disk, locator, self.hotplug_timeout)
                node, ro = disk.node, disk.readonly
            found = time.monotonic()
            done = await asyncio.to_thread(mount_rootfs, node, s.mount_point,
                                           s.fstype or "ext4", readonly=ro or "ro" in s.options)
            timings["wait"] = timings.get("wait", 0.0) + found - started
            timings["fsck"] = timings.get("fsck", 0.0) + done.fsck_seconds
            timings["mount"] = (timings.get("mount", 0.0) + time.monotonic() - found
                                - done.fsck_seconds)
        except GuestHookError as exc:
            raise _to_status(exc) from exc
        return done

    async def create(self, _ctx: CallContext, payload: bytes) -> bytes:
        req = ap.CreateContainerRequest.decode(payload)
        cid = req.container_id
        if not cid or "/" in cid or cid.startswith("."):
            raise errors.InvalidArgument(f"bad container id {cid!r}")
        if cid in self.containers:
            raise errors.AlreadyExists(f"container {cid!r} exists")
        if req.oci is None or req.oci.process is None or not req.oci.root_path:
            raise errors.InvalidArgument("OCI spec with process and root path required")
        mounted: list[str] = []
        watch: list[str] = []
        bundle = os.path.join(RUN, cid)
        timings: dict[str, float] = {}
        try:
            for storage in req.storages:
                done = await self._mount_storage(storage, timings)
                mounted.append(done.target)
                watch += [done.target] + ([done.readonly_lower] if done.readonly_lower else [])
            runc_started = time.monotonic()
            os.makedirs(bundle, exist_ok=True)
            _write(os.path.join(bundle, "config.json"), json.dumps(_oci_config(req.oci, cid)))
            hooked = time.monotonic()
            await self._run_hooks("prestart", cid, "creating", bundle, req.oci.annotations)
            if self.guest_hook_path and not req.storages:
                timings["hooks"] = time.monotonic() - hooked
                mounted.append(req.oci.root_path)
                watch.append(req.oci.root_path)
            out = os.path.join(bundle, "stdout")
            sink = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                proc = await asyncio.create_subprocess_exec(
                    "runc", "create", "--bundle", bundle, "--pid-file",
                    os.path.join(bundle, "pid"), cid, stdin=asyncio.subprocess.DEVNULL,
                    stdout=sink, stderr=sink)
            finally:
                os.close(sink)
            rc = await _bounded(proc, proc.wait(), "runc create")
            if rc != 0:
                tail = _read(out, 0, 1 << 20)[-500:].decode("utf-8", "replace")
                raise errors.Internal(f"runc create exited {rc}: {tail}")
            pid = int(_read(os.path.join(bundle, "pid"), 0, 64).strip())
            timings["runc-create"] = time.monotonic() - runc_started
        except BaseException:
            for target in reversed(mounted):
                with contextlib.suppress(Exception):
                    umount_rootfs(target)
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        self.containers[cid] = Container(cid, bundle, mounted, pid, stdout=out, watch=watch,
                                         annotations=req.oci.annotations)
        for source, where, fstype in mountpoints():  # the guest's own view, for the tests
            if where in watch:
                print(f"AGENT-MOUNTED {cid} {where} {source} {fstype}", flush=True)
        print(f"AGENT-CREATED {cid} " + " ".join(f"{k}={v:.3f}" for k, v in timings.items()),
              flush=True)
        return ap.EMPTY

    async def start(self, _ctx: CallContext, payload: bytes) -> bytes:
        c = self._get(ap.ContainerRequest.decode(payload).container_id)
        if c.exit is not None:
            raise errors.FailedPrecondition(f"container {c.cid} already started")
        loop = asyncio.get_running_loop()
        c.exit = loop.create_future()
        exit_fut = c.exit
        pid = c.pid

        def reap() -> None:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            loop.call_soon_threadsafe(exit_fut.set_result, code if code >= 0 else 128 - code)

        loop.run_in_executor(None, reap)
        proc = await asyncio.create_subprocess_exec(
            "runc", "start", c.cid, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        text, _ = await _bounded(proc, proc.communicate(), "runc start")
        if proc.returncode != 0:
            raise errors.Internal(f"runc start exited {proc.returncode}: {text.decode()[-500:]}")
        return ap.EMPTY

    async def wait(self, _ctx: CallContext, payload: bytes) -> bytes:
        c = self._get(ap.ContainerRequest.decode(payload).container_id)
        if c.exit is None:
            raise errors.FailedPrecondition(f"container {c.cid} not started")
        return ap.encode_wait_response(await asyncio.shield(c.exit))

    async def read_stdout(self, _ctx: CallContext, payload: bytes) -> bytes:
        req = ap.ContainerRequest.decode(payload)
        c = self._get(req.container_id)
        data = _read(c.stdout, c.read_offset, req.length or 65536)
        c.read_offset += len(data)
        return ap.encode_read_response(data)

    async def copy_file(self, _ctx: CallContext, payload: bytes) -> bytes:
        """Kata's ``CopyFile``: path=1 (absolute, below /run), offset=7, data=8 (the benchmark's
        copy-the-rootfs-in baseline)."""
        req = ap.CopyFileRequest.decode(payload)
        if not req.path.startswith("/run/") or ".." in req.path.split("/"):
            raise errors.InvalidArgument(f"CopyFile path {req.path!r} must be below /run")
        os.makedirs(os.path.dirname(req.path), exist_ok=True)
        _write_at(req.path, req.offset, req.data)
        return ap.EMPTY

    async def remove(self, _ctx: CallContext, payload: bytes) -> bytes:
        req = ap.ContainerRequest.decode(payload, remove=True)
        c = self._get(req.container_id)
        if c.exit is None or not c.exit.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
            if c.exit is None:
                c.exit = asyncio.get_running_loop().create_future()
                c.exit.set_result(137)
                with contextlib.suppress(ChildProcessError):
                    await asyncio.to_thread(os.waitpid, c.pid, 0)
            else:
                await asyncio.wait_for(asyncio.shield(c.exit), req.timeout or 30)
        proc = await asyncio.create_subprocess_exec(
            "runc", "delete", "--force", c.cid, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        text, _ = await _bounded(proc, proc.communicate(), "runc delete")
        if proc.returncode != 0:
            raise errors.Internal(f"runc delete exited {proc.returncode}: {text.decode()}")
        await self._run_hooks("poststop", c.cid, "stopped", c.bundle, c.annotations)
        for target in reversed(c.mounts):
            try:
                await asyncio.to_thread(umount_rootfs, target)
            except GuestHookError as exc:
                raise _to_status(exc) from exc
        shutil.rmtree(c.bundle, ignore_errors=True)
        del self.containers[c.cid]
        left = [where for _s, where, _f in mountpoints()
                if any(where == t or where.startswith(t + "/") for t in c.watch)]
        print(f"AGENT-REMOVED {c.cid} mounts-left={len(left)}", flush=True)
        return ap.EMPTY


async def _bounded(proc: asyncio.subprocess.Process, waiting: Awaitable[T],
                   what: str, timeout: float = COMMAND_TIMEOUT) -> T:
    """Await a child's completion; kill it and raise DEADLINE_EXCEEDED after ``timeout``."""
    try:
        return await asyncio.wait_for(waiting, timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise errors.DeadlineExceeded(f"{what} did not finish within {timeout:g}s") from None


def _list_dir(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def _write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _oci_config(spec: ap.Spec, cid: str) -> dict[str, object]:
    assert spec.process is not None
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0},
                    "args": spec.process.args,
                    "env": spec.process.env or ["PATH=/bin:/sbin:/usr/bin:/usr/sbin"],
                    "cwd": spec.process.cwd or "/", "noNewPrivileges": True},
        "root": {"path": spec.root_path, "readonly": spec.root_readonly},
        "hostname": spec.hostname or cid,
        "annotations": spec.annotations,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                  "cgroupsPath": f"/kata-ipu/{cid}"},
    }


def _find_port(name: str) -> str | None:
    base = "/sys/class/virtio-ports"
    with contextlib.suppress(OSError):
        for port in sorted(os.listdir(base)):
            with contextlib.suppress(OSError), open(os.path.join(base, port, "name")) as f:
                if f.read().strip() == name:
                    return f"/dev/{port}"
    return None


def _setup_guest() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    targets = {where for _s, where, _f in mountpoints()}
    for fstype, target in (("tmpfs", "/run"), ("tmpfs", "/tmp"),
                           ("cgroup2", "/sys/fs/cgroup")):
        if target not in targets:
            os.makedirs(target, exist_ok=True)
            sys_mount(fstype, target, fstype)
    os.makedirs(RUN, exist_ok=True)


async def serve(port_name: str, hotplug_timeout: float, guest_hook_path: str = "") -> None:
    agent = Agent(hotplug_timeout, guest_hook_path)
    server = Server()
    server.register(ap.SERVICE, agent.handlers())
    announced = False
    while True:
        port = _find_port(port_name)
        if port is None:
            await asyncio.sleep(0.1)
            continue
        fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
        if not announced:
            print(f"AGENT-READY port={port}", flush=True)
            announced = True
        await server.serve_pipe(os.fdopen(fd, "rb", buffering=0),
                                os.fdopen(os.dup(fd), "wb", buffering=0))
        await asyncio.sleep(0.1)  # host not connected (EOF): reopen and wait for it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guest_agent")
    parser.add_argument("--port", default="agent.channel.0")
    parser.add_argument("--hotplug-timeout", type=float, default=3.0)
    parser.add_argument("--guest-hook-path", default="")
    args = parser.parse_args(argv)
    _setup_guest()
    try:
        asyncio.run(serve(args.port, args.hotplug_timeout, args.guest_hook_path))
    except BaseException as exc:  # PID 1 must not die silently: the console shows why
        print(f"AGENT-FAILED {exc!r}", file=sys.stderr, flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
