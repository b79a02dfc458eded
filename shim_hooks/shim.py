"""``containerd-shim-kata-ipu-v2``: the shim v2 binary of runtime ``io.containerd.kata-ipu.v2``.

containerd runs it with Go-style flags (``-namespace ns -address a -publish-binary b -id x
[-bundle B] [-debug] start|delete``), cwd = the bundle:

``start``
    Starts the delegate shim with the same flags and stdin (the runtime options), forks the
    proxy (:mod:`shim_hooks.proxy`), which listens on its own socket, and prints that socket's
    address alone on stdout once it listens. When the delegate answers with an address a proxy
    already serves (the runc shim groups a pod's containers), that proxy's address is printed
    again.
``delete``
    Cleanup after a dead shim: stops a delegate the dead proxy left running, runs the delegate's
    own ``delete``, releases the IPU volume recorded in the bundle, and writes the delegate's
    binary ``DeleteResponse`` (or its own: exit 137) on stdout.

Startup latency is on every container's critical path, so the module imports only what
``start``/``delete`` need; the proxy (asyncio, ttrpc, protobuf) is imported while the delegate
starts, and the proxy process is a fork of ``start``, not a second interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from kata_ipu.errors import KataIpuError
from shim_hooks import bundle as bundles
from shim_hooks import config as shimconfig
from shim_hooks import runtimeopts, shimlog
from shim_hooks.taskapi import TASK_SERVICE, DeleteResponse, decode_connect_response, id_request

log = logging.getLogger("shim_hooks.shim")

START_TIMEOUT = 30.0
DELEGATE_TIMEOUT = 60.0


def build_parser() -> argparse.ArgumentParser:
    # containerd passes Go-style single-dash long flags: -namespace ns -address a -id x start
    p = argparse.ArgumentParser(
        prog="containerd-shim-kata-ipu-v2",
        description="containerd shim v2 (io.containerd.kata-ipu.v2): asks kata-ipud for a "
        "block-device rootfs and forwards the Task API to the real shim.",
    )
    for flag in ("-namespace", "-address", "-publish-binary", "-id", "-bundle", "-socket"):
        p.add_argument(flag, default="")
    p.add_argument("-debug", action="store_true")
    p.add_argument("action", nargs="?", choices=["start", "delete"])
    return p


def delegate_argv(binary: str, args: argparse.Namespace, action: str) -> list[str]:
    """The delegate's command line: containerd's flags, unchanged, then the action."""
    argv = [binary]
    for flag in ("namespace", "address", "publish-binary", "id", "bundle"):
        value = getattr(args, flag.replace("-", "_"))
        if value:
            argv += [f"-{flag}", value]
    if args.debug:
        argv.append("-debug")
    argv.append(action)
    return argv


def proxy_socket(cfg: shimconfig.ShimConfig, delegate_address: str) -> str:
    """One proxy per delegate socket (so a grouped delegate gets one proxy)."""
    digest = hashlib.sha256(delegate_address.encode()).hexdigest()[:32]
    return os.path.join(cfg.socket_dir, f"{digest}.sock")


def _serving(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class ShimError(Exception):
    """``start``/``delete`` failed; the message goes to stderr for containerd's error."""


def start(args: argparse.Namespace, cfg: shimconfig.ShimConfig) -> str:
    t0 = time.monotonic()
    bundle = Path(args.bundle or os.getcwd())
    options = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    opts = runtimeopts.parse(options)
    if opts.delegate is not None:  # the handler's runtime options are the most specific
        cfg = replace(cfg, delegate=opts.delegate)
    binary = shimconfig.resolve_binary(cfg.delegate_binary)
    argv = delegate_argv(binary, args, "start")
    log.info("starting delegate", extra={"delegate": cfg.delegate, "argv": argv})
    proc = subprocess.Popen(argv, cwd=bundle, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    with proc:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(runtimeopts.for_delegate(options, opts, cfg.delegate))
            proc.stdin.close()
        # load the proxy while the delegate starts: it is only needed from here on
        from shim_hooks import proxy  # noqa: PLC0415 - deferred, see the module docstring
        output = proc.stdout.read().decode(errors="replace").strip()
        rc = proc.wait(START_TIMEOUT)
    if rc != 0:
        raise ShimError(f"delegate {binary} start failed (exit {rc}): {output}")
    t_delegate = time.monotonic() - t0
    delegate_address = output
    listen = proxy_socket(cfg, delegate_address)
    address = f"unix://{listen}"
    record: dict[str, object] = {"delegate": cfg.delegate, "delegate_binary": binary,
              "delegate_address": delegate_address, "address": address,
              "ipu_address": cfg.address}
    bundles.write_json(bundle / bundles.SHIM_RECORD, record)
    if _serving(listen):
        log.info("reusing the proxy of a grouped delegate", extra={"address": address})
    else:
        os.makedirs(cfg.socket_dir, mode=0o711, exist_ok=True)
        _fork_proxy(lambda ready: _serve(proxy, args, cfg, bundle, record, ready))
    (bundle / "address").write_text(address)
    log.info("shim started", extra={"address": address, "delegate_seconds": round(t_delegate, 6),
                                    "start_seconds": round(time.monotonic() - t0, 6)})
    return address


def _fork_proxy(serve: Callable[[Callable[[], None]], int]) -> None:
    """Fork the proxy process; return once it listens (or raise if it died first)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the proxy: detached from containerd's pipes and process group
        rc = 1
        try:
            os.close(r)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)

            def ready() -> None:
                os.write(w, b"1")
                os.close(w)

            rc = serve(ready)
        except BaseException:
            log.exception("proxy failed")
        finally:
            os._exit(rc)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        ok = pipe.read(1)  # EOF without a byte: the proxy died before listening
    if ok != b"1":
        raise ShimError("kata-ipu proxy did not start; see the shim log")


def _serve(proxy: ModuleType, args: argparse.Namespace, cfg: shimconfig.ShimConfig,
           bundle: Path, record: dict[str, object], ready: Callable[[], None]) -> int:
    import asyncio  # noqa: PLC0415 - already loaded with the proxy

    from kata_ipu.ttrpc import NAMESPACE_KEY, Client, Metadata  # noqa: PLC0415 - loaded

    delegate_address = str(record["delegate_address"])

    async def remember_delegate_pid() -> None:
        """So that ``delete`` can stop a delegate whose proxy was killed."""
        try:
            async with await Client.connect(delegate_address, timeout=5) as c:
                reply = await c.call(TASK_SERVICE, "Connect", id_request(args.id), timeout=5,
                                     metadata=Metadata([(NAMESPACE_KEY, args.namespace)]))
        except KataIpuError as exc:
            log.debug("delegate Connect failed: %s", exc)
            return
        pid = decode_connect_response(reply)[0]
        if pid:
            bundles.write_json(bundle / bundles.SHIM_RECORD, {**record, "delegate_pid": pid})

    async def main() -> None:
        tasks: set[asyncio.Task[None]] = set()

        def on_ready() -> None:
            ready()
            tasks.add(asyncio.ensure_future(remember_delegate_pid()))

        await proxy.serve(cfg, delegate_address, str(record["address"]), args.namespace,
                          on_ready)

    asyncio.run(main())
    return 0


def _pid_is(pid: int, binary: str, bundle: Path) -> bool:
    """Is ``pid`` still that delegate (same binary, working in this bundle: pids get reused)?"""
    try:
        return (os.path.basename(os.readlink(f"/proc/{pid}/exe")) == os.path.basename(binary)
                and os.readlink(f"/proc/{pid}/cwd") == str(bundle))
    except OSError:
        return False


def _running(pid: int) -> bool:
    """Exists and is not a zombie yet (a zombie has closed all its files)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _kill_lingering_delegate(record: dict[str, object], bundle: Path) -> bool:
    pid, binary = record.get("delegate_pid"), record.get("delegate_binary")
    if not isinstance(pid, int) or not isinstance(binary, str) or not _pid_is(pid, binary,
                                                                             bundle):
        return False
    log.warning("killing the delegate shim its dead proxy left running", extra={"pid": pid})
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def remove_dead_socket(address: object, wait: float = 0.0) -> None:
    """Remove a ``unix://`` socket file nobody answers on (its server died), waiting up to
    ``wait`` seconds for a server that is being killed to let go of it."""
    if not isinstance(address, str) or not address.startswith("unix://"):
        return
    path = address.removeprefix("unix://")
    deadline = time.monotonic() + wait
    while os.path.exists(path):
        if not _serving(path):
            bundles.remove(Path(path))
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def delete(args: argparse.Namespace, cfg: shimconfig.ShimConfig) -> bytes:
    bundle = Path(args.bundle or os.getcwd())
    record = bundles.read_json(bundle / bundles.SHIM_RECORD) or {}
    volume = bundles.read_json(bundle / bundles.VOLUME_RECORD)
    killed = _kill_lingering_delegate(record, bundle.resolve())
    # a killed proxy or delegate leaves its socket; the delegate's own cleanup removes only the
    # socket named in <bundle>/address, which is the proxy's. A killed Go process lets go of
    # its files only when its last thread is gone, after the leader turned zombie.
    remove_dead_socket(record.get("address"))
    remove_dead_socket(record.get("delegate_address"), wait=5.0 if killed else 0.0)
    binary = str(record.get("delegate_binary") or shimconfig.resolve_binary(
        cfg.delegate_binary))
    reply = b""
    try:
        res = subprocess.run(delegate_argv(binary, args, "delete"), cwd=bundle,
                             stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=DELEGATE_TIMEOUT, check=False)
        if res.returncode == 0:
            reply = res.stdout
        else:
            log.error("delegate delete failed (exit %d): %s", res.returncode,
                      res.stderr.decode(errors="replace").strip())
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("delegate delete failed: %s", exc)
    if volume is not None and isinstance(volume.get("key"), str):
        address = str(volume.get("address") or cfg.address)
        import asyncio  # noqa: PLC0415 - only a dead shim's volume needs it

        from shim_hooks import ipu  # noqa: PLC0415 - only a dead shim's volume needs it

        try:
            asyncio.run(ipu.release(address, volume["key"]))
            bundles.remove(bundle / bundles.VOLUME_RECORD)
            log.info("rootfs released after a dead shim", extra={"key": volume["key"]})
        except KataIpuError as exc:
            log.error("%s", exc)
            raise ShimError(str(exc)) from exc
    if not reply:
        now = time.time()
        reply = DeleteResponse(exit_status=128 + signal.SIGKILL, exited_seconds=int(now),
                               exited_nanos=int((now % 1) * 1e9)).encode()
    return reply


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action is None:
        build_parser().error("an action is required: start or delete")
    bundle = args.bundle or os.getcwd()
    stream = shimlog.setup(bundle, args.debug)
    try:
        cfg = shimconfig.load()
        if args.action == "start":
            address = start(args, cfg)
            sys.stdout.write(address)
            sys.stdout.flush()
            return 0
        sys.stdout.buffer.write(delete(args, cfg))
        sys.stdout.flush()
        return 0
    except (ShimError, KataIpuError, OSError, subprocess.SubprocessError) as exc:
        log.error("kata-ipu shim %s failed: %s", args.action, exc)
        print(f"containerd-shim-kata-ipu-v2 {args.action}: {exc}", file=sys.stderr)
        return 1
    finally:
        shimlog.close(stream)


if __name__ == "__main__":
    sys.exit(main())
