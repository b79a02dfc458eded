"""``containerd-shim-kata-ipu-v2``: the shim v2 binary of runtime ``io.containerd.kata-ipu.v2``.

containerd runs it with Go-style flags (``-namespace ns -address a -publish-binary b -id x
[-bundle B] [-debug] start|delete``), cwd = the bundle:

``start``
    Starts the delegate shim with the same flags and stdin (the runtime options) and, while it
    starts, asks kata-ipud to prepare the container's rootfs; forks the proxy
    (:mod:`shim_hooks.proxy`), which listens on its own socket, and prints that socket's
    address alone on stdout once it listens. When the delegate answers with an address a proxy
    already serves (the runc shim groups a pod's containers), that proxy's address is printed
    again. With the resident server (:mod:`shim_hooks.server`) this runs in the server's forked
    child, which becomes the proxy itself (:func:`serve_in_place`).
``delete``
    Cleanup after a dead shim: stops a delegate the dead proxy left running, runs the delegate's
    own ``delete``, releases the IPU volume recorded in the bundle, and writes the delegate's
    binary ``DeleteResponse`` (or its own: exit 137) on stdout.

Startup latency is on every container's critical path, so the module imports only what
``start``/``delete`` need; the proxy (asyncio, ttrpc, protobuf) is imported while the delegate
starts, and the proxy process is a fork of ``start``, not a second interpreter. The binary's
entry point (:mod:`shim_hooks.launcher`) avoids even that when kata-ipu-shimd runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kata_ipu.errors import KataIpuError
from kata_ipu.osutil import unixsock
from shim_hooks import bundle as bundles
from shim_hooks import config as shimconfig
from shim_hooks import runtimeopts, shimlog
from shim_hooks.taskapi import DeleteResponse

if TYPE_CHECKING:
    import asyncio

    from shim_hooks.proxy import EarlyPrepare

log = logging.getLogger("shim_hooks.shim")

START_TIMEOUT = 30.0
DELEGATE_TIMEOUT = 60.0


@functools.cache
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


CONTAINERD_SOCKETS = "/run/containerd/s"  # containerd's shim library: socketRoot + "/s"


def group_delegate_address(args: argparse.Namespace, spec: dict[str, object],
                           cid: str) -> str | None:
    """The address the delegate's ``start`` would answer for a container that joins a group
    (a pod's later container), computed as containerd's shim library does for runc's and
    Kata's shims (``shim.SocketAddress``: sha256 of ``filepath.Join(address, namespace,
    group)``); None for a container that starts a group of its own."""
    group = bundles.shim_group(spec, cid)
    if group == cid or not args.address or not args.namespace:
        return None
    key = os.path.normpath(os.path.join(args.address, args.namespace, group))
    return f"unix://{CONTAINERD_SOCKETS}/{hashlib.sha256(key.encode()).hexdigest()}"


class ShimError(Exception):
    """``start``/``delete`` failed; the message goes to stderr for containerd's error."""


@dataclass(frozen=True)
class Launched:
    """A started delegate: what ``start`` prints, and what its proxy needs to serve."""

    address: str  # ours, for containerd
    listen: str  # the socket path behind ``address``
    delegate_address: str
    record: dict[str, object]
    early: EarlyPrepare | None  # the rootfs prepared while the delegate started
    grouped: bool  # a proxy already serves this delegate (a pod's later container)


@dataclass(frozen=True)
class DelegatePlan:
    """Which delegate shim ``start`` runs, and with what."""

    cfg: shimconfig.ShimConfig  # with the delegate the runtime options chose
    bundle: Path
    options: bytes  # containerd's runtime options, as it wrote them
    opts: runtimeopts.RuntimeOptions


def plan_delegate(args: argparse.Namespace, cfg: shimconfig.ShimConfig,
                  options: bytes) -> DelegatePlan:
    opts = runtimeopts.parse(options)
    if opts.delegate is not None:  # the handler's runtime options are the most specific
        cfg = replace(cfg, delegate=opts.delegate)
    return DelegatePlan(cfg, Path(args.bundle or os.getcwd()), options, opts)


@dataclass
class Delegate:
    """A delegate shim's ``start`` in flight."""

    proc: subprocess.Popen[bytes]
    binary: str
    cfg: shimconfig.ShimConfig  # with the delegate the runtime options chose
    bundle: Path
    t0: float


def spawn_delegate(args: argparse.Namespace, plan: DelegatePlan) -> Delegate:
    """Run the delegate's ``start`` with containerd's flags and (translated) options."""
    t0 = time.monotonic()
    cfg, bundle = plan.cfg, plan.bundle
    binary = shimconfig.resolve_binary(cfg.delegate_binary)
    argv = delegate_argv(binary, args, "start")
    log.debug("starting delegate", extra={"delegate": cfg.delegate, "argv": argv})
    proc = subprocess.Popen(argv, cwd=bundle, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(runtimeopts.for_delegate(plan.options, plan.opts, cfg.delegate))
        proc.stdin.close()
    return Delegate(proc, binary, cfg, bundle, t0)


def delegate_output(d: Delegate) -> tuple[str, int]:
    """The delegate's ``start``: what it printed (its address, or why it failed), its status."""
    assert d.proc.stdout is not None
    with d.proc:
        output = d.proc.stdout.read().decode(errors="replace").strip()
        return output, d.proc.wait(START_TIMEOUT)


async def delegate_output_async(d: Delegate) -> tuple[str, int]:
    """:func:`delegate_output` on the running event loop: the output is read as it comes and
    the exit is seen through a pidfd, with no thread to hand the result over and no polling
    (either costs a wake-up or a timer tick on the container's critical path)."""
    import asyncio  # noqa: PLC0415 - only in a process that runs a loop

    assert d.proc.stdout is not None
    try:
        pidfd = os.pidfd_open(d.proc.pid)
    except OSError:  # a kernel older than 5.3
        return await asyncio.to_thread(delegate_output, d)
    loop = asyncio.get_running_loop()
    out = d.proc.stdout.fileno()
    os.set_blocking(out, False)
    chunks: list[bytes] = []
    exited: asyncio.Future[None] = loop.create_future()

    def drain() -> None:
        """What is in the pipe now (a daemon the delegate leaves behind could hold it open:
        its end is not awaited)."""
        try:
            while data := os.read(out, 65536):
                chunks.append(data)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("reading the delegate's start output: %s", exc)
        loop.remove_reader(out)  # end of file (or unreadable)

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(out, drain)  # as it comes: a pipe holds only 64 KiB
    loop.add_reader(pidfd, on_exit)
    with d.proc:
        try:
            await asyncio.wait_for(exited, START_TIMEOUT)
            drain()
        except TimeoutError:
            d.proc.kill()
            raise ShimError(f"delegate {d.binary} start did not finish in "
                            f"{START_TIMEOUT:.0f} s") from None
        finally:
            loop.remove_reader(out)
            loop.remove_reader(pidfd)
            os.close(pidfd)
        rc = d.proc.wait()  # it has exited: reaped at once
    return b"".join(chunks).decode(errors="replace").strip(), rc


def delegate_started(d: Delegate, output: str, rc: int) -> Launched:
    """The delegate's ``start`` ended with ``output`` and ``rc``: pick the proxy's socket (the
    caller records it, :func:`record_started`)."""
    if rc != 0:
        raise ShimError(f"delegate {d.binary} start failed (exit {rc}): {output}")
    cfg = d.cfg
    delegate_address = output
    listen = proxy_socket(cfg, delegate_address)
    address = f"unix://{listen}"
    shim_record: dict[str, object] = {
        "delegate": cfg.delegate, "delegate_binary": d.binary,
        "delegate_address": delegate_address, "address": address, "ipu_address": cfg.address}
    grouped = unixsock.is_serving(listen)
    if grouped:
        log.info("reusing the proxy of a grouped delegate", extra={"address": address})
    return Launched(address, listen, delegate_address, shim_record, None, grouped)


def write_records(bundle: Path, launched: Launched) -> None:
    """Write down, in the bundle, what the ``delete`` action needs after a dead shim (the
    shim record) and the address the delegate's own cleanup removes (ours, not its own)."""
    bundles.write_json(bundle / bundles.SHIM_RECORD, launched.record)
    (bundle / "address").write_text(launched.address)


def record_started(d: Delegate, launched: Launched) -> None:
    write_records(d.bundle, launched)
    log.info("delegate started", extra={"address": launched.address,
                                        "delegate_seconds": round(time.monotonic() - d.t0, 6)})


def start(args: argparse.Namespace, cfg: shimconfig.ShimConfig, options: bytes,
          report: Callable[[str], None]) -> None:
    """``start`` in its own process: launch, fork the proxy, print its address.

    The bundle's ``config.json`` is complete when containerd runs ``start``, so the IPU
    prepares container ``-id``'s rootfs while the delegate's own start runs; the proxy hands
    it to ``Create``. ``report(address)`` tells containerd the address once the proxy listens.
    """
    from shim_hooks import proxy  # noqa: PLC0415 - deferred, see the module docstring

    t0 = time.monotonic()
    d = spawn_delegate(args, plan_delegate(args, cfg, options))
    early: EarlyPrepare | None = None
    try:
        early = proxy.EarlyPrepare.run(d.cfg, args.namespace, args.id, d.bundle)
        launched = delegate_started(d, *delegate_output(d))
        record_started(d, launched)
        if not launched.grouped:  # where the proxy will listen
            os.makedirs(d.cfg.socket_dir, mode=0o711, exist_ok=True)
    except BaseException:
        if early is not None:
            early.discard()
        raise
    if launched.grouped:
        if early is not None:  # only a new proxy can hand it to Create
            early.discard()
    else:
        launched = replace(launched, early=early)
        _fork_proxy(lambda ready: _serve(args, d.cfg, launched, ready))
    report(launched.address)
    log.info("shim started", extra={"address": launched.address,
                                    "start_seconds": round(time.monotonic() - t0, 6)})


_warm_loop: asyncio.AbstractEventLoop | None = None  # see prewarm_loop


def prewarm_loop(address: str | None) -> None:
    """In an idle kata-ipu-shimd spare: make the event loop :func:`serve_in_place` will run,
    with its worker thread already started and a connection to kata-ipud at ``address`` open
    (making them when a start arrives costs milliseconds on a busy host, on the container's
    critical path)."""
    import asyncio  # noqa: PLC0415 - preloaded by the server

    global _warm_loop  # noqa: PLW0603 - one per spare process, taken by its one start

    from shim_hooks import ipu  # noqa: PLC0415 - preloaded by the server

    async def start_worker() -> None:
        await asyncio.to_thread(int)
        if address is not None:
            await ipu.keep_connection(address)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start_worker())
    _warm_loop = loop


def serve_in_place(args: argparse.Namespace, cfg: shimconfig.ShimConfig, options: bytes,
                   report: Callable[[str], None]) -> int:
    """``start`` in a process that then becomes the proxy (kata-ipu-shimd's child).

    One event loop does it all: the delegate is forked first (its own start is the longest
    step), ``Prepare``'s request goes out while it starts (the IPU works meanwhile), the
    delegate's output is read on the loop, the address is reported as soon as the delegate has
    started and the proxy listens, and ``Create`` waits for the rootfs only if it is not ready
    yet.
    """
    global _warm_loop  # this start takes the loop its spare prepared (prewarm_loop)
    import asyncio  # noqa: PLC0415 - preloaded by the server

    from kata_ipu.ttrpc import UnixListener  # noqa: PLC0415 - preloaded by the server
    from shim_hooks import ipu, proxy  # noqa: PLC0415 - preloaded by the server

    async def run() -> None:
        plan = plan_delegate(args, cfg, options)
        joining = await join_group(args, plan)
        if joining is not None:
            joined, answered = joining
            report(joined.address)
            try:
                write_records(plan.bundle, joined)
            except OSError as exc:
                log.error("cannot record the delegate in the bundle: %s", exc)
            await answered
            return
        # the delegate's own start is the longest step of this one: it goes first, and the
        # IPU's Prepare and the proxy's socket are set up while it runs
        d = spawn_delegate(args, plan)
        early: proxy.EarlyPrepare | None = None
        listener: UnixListener | None = None
        try:
            early = proxy.EarlyPrepare.begin(plan.cfg, args.namespace, args.id, plan.bundle)
            # the proxy's socket, listening while the delegate starts; named after the
            # delegate's address once that is known
            os.makedirs(plan.cfg.socket_dir, mode=0o711, exist_ok=True)
            listener = UnixListener(os.path.join(plan.cfg.socket_dir, f".{os.getpid()}.sock"))
            launched = delegate_started(d, *await delegate_output_async(d))
        except BaseException:
            if listener is not None:
                listener.close()
            if early is not None:
                await early.release_async()
            raise
        await ipu.drop_kept()  # early's Prepare has taken its connection, if it had one

        def ready() -> None:
            report(launched.address)
            try:  # containerd's Create need not wait for these files
                record_started(d, launched)
            except OSError as exc:
                log.error("cannot record the delegate in the bundle: %s", exc)

        if launched.grouped:
            listener.close()
            if early is not None:
                await early.release_async()
            ready()
            return
        set_process_name(PROXY_NAME)
        await proxy.serve(d.cfg, launched.delegate_address, launched.listen, args.namespace,
                          ready, cid=args.id, early=early, bundle=d.bundle,
                          record=launched.record, listener=listener)

    loop, _warm_loop = _warm_loop, None
    with asyncio.Runner(loop_factory=None if loop is None else lambda: loop) as runner:
        runner.run(run())
    return 0


async def join_group(args: argparse.Namespace,
                     plan: DelegatePlan) -> tuple[Launched, Awaitable[None]] | None:
    """A pod's later container whose group a proxy of ours serves already: that proxy's
    address, without running the delegate's ``start`` (which would only answer its own
    socket, :func:`group_delegate_address`), and the proxy told to prepare the container's
    rootfs now (``Expect``). The second item waits for the proxy's answer to ``Expect``: the
    request is on the wire when this returns, so the caller reports the address first (the
    proxy reads the request before containerd, told the address, can connect). None: start
    the delegate as for a new group."""
    import asyncio  # noqa: PLC0415 - preloaded by the server

    from kata_ipu.ttrpc import NAMESPACE_KEY, Client, Metadata  # noqa: PLC0415 - preloaded
    from shim_hooks import proxy  # noqa: PLC0415 - preloaded by the server
    from shim_hooks.taskapi import id_request  # noqa: PLC0415

    try:
        spec = bundles.read_spec(plan.bundle)
    except KataIpuError:
        return None  # Create says what is wrong with the bundle
    delegate_address = group_delegate_address(args, spec, args.id)
    if delegate_address is None:
        return None
    listen = proxy_socket(plan.cfg, delegate_address)
    try:
        binary = shimconfig.resolve_binary(plan.cfg.delegate_binary)
    except KataIpuError:
        return None  # the delegate's start says it is missing
    try:
        client = await Client.connect(f"unix://{listen}", timeout=1.0)
    except KataIpuError:
        return None  # no proxy of ours serves the group (yet): the delegate decides
    expect = asyncio.ensure_future(client.call(
        proxy.PROXY_SERVICE, "Expect", id_request(args.id, str(plan.bundle)), timeout=5.0,
        metadata=Metadata([(NAMESPACE_KEY, args.namespace)])))
    await asyncio.sleep(0)  # the call's first step writes the request

    async def answered() -> None:
        async with client:
            try:
                await expect
            except KataIpuError as exc:  # an older proxy: Create prepares, as before
                log.debug("the group's proxy does not take Expect: %s", exc)

    cfg = plan.cfg
    address = f"unix://{listen}"
    record: dict[str, object] = {
        "delegate": cfg.delegate, "delegate_binary": binary,
        "delegate_address": delegate_address, "address": address, "ipu_address": cfg.address}
    log.info("joined the proxy of the container's group", extra={"address": address})
    return Launched(address, listen, delegate_address, record, None, True), answered()


def _fork_proxy(serve: Callable[[Callable[[], None]], int]) -> None:
    """Fork the proxy process; return once it listens (or raise if it died first)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the proxy: detached from containerd's pipes and process group
        rc = 1
        try:
            os.close(r)
            os.setsid()
            detach_stdio()

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


PROXY_NAME = "kata-ipu-proxy"


def set_process_name(name: str) -> None:
    """What ps and top show for the proxy (its argv is that of ``start`` or of the server)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


def detach_stdio() -> None:
    """Point 0, 1 and 2 at /dev/null: containerd reads ``start``'s pipes until EOF."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _serve(args: argparse.Namespace, cfg: shimconfig.ShimConfig, launched: Launched,
           ready: Callable[[], None]) -> int:
    import asyncio  # noqa: PLC0415 - already loaded with the proxy

    from shim_hooks import proxy  # noqa: PLC0415 - loaded by start()

    set_process_name(PROXY_NAME)
    asyncio.run(proxy.serve(cfg, launched.delegate_address, launched.listen, args.namespace,
                            ready, cid=args.id, early=launched.early,
                            bundle=Path(args.bundle or os.getcwd()), record=launched.record))
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
        if not unixsock.is_serving(path):
            bundles.remove(Path(path))
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def delete(args: argparse.Namespace, cfg: shimconfig.ShimConfig) -> bytes:
    bundle = Path(args.bundle or os.getcwd())
    record = bundles.read_json(bundle / bundles.SHIM_RECORD) or {}
    volume = bundles.read_json(bundle / bundles.VOLUME_RECORD)
    # containerd runs `delete` whenever a connection to the shim closes, which includes the
    # normal end of a container whose shim serves others too (a pod's sandbox deleted before
    # its apps). Only a proxy that no longer answers left its delegate behind.
    address = record.get("address")
    proxy_alive = (isinstance(address, str) and address.startswith("unix://") and
                   unixsock.is_serving(address.removeprefix("unix://")))
    killed = not proxy_alive and _kill_lingering_delegate(record, bundle.resolve())
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
            mountpoint = volume.get("mountpoint")
            if isinstance(mountpoint, str) and mountpoint:  # the proxy mounted it itself
                from shim_hooks import hostmount  # noqa: PLC0415 - only then

                hostmount.umount(mountpoint)
            asyncio.run(ipu.release(address, volume["key"]))
            bundles.remove(bundle / bundles.VOLUME_RECORD)
            log.info("rootfs released after a dead shim", extra={"key": volume["key"]})
        except (KataIpuError, OSError) as exc:
            log.error("%s", exc)
            raise ShimError(str(exc)) from exc
    if not reply:
        now = time.time()
        reply = DeleteResponse(exit_status=128 + signal.SIGKILL, exited_seconds=int(now),
                               exited_nanos=int((now % 1) * 1e9)).encode()
    return reply


def read_options() -> bytes:
    """The runtime options containerd writes on stdin (nothing from a terminal)."""
    return b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()


def print_address(address: str) -> None:
    sys.stdout.write(address)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None,
         serve: Callable[[argparse.Namespace, shimconfig.ShimConfig, bytes,
                          Callable[[str], None]], int | None] | None = None,
         report: Callable[[str], None] = print_address) -> int:
    """The shim binary. ``serve``/``report`` replace the fork-and-print of ``start`` in the
    resident server's child (:func:`serve_in_place`)."""
    args = build_parser().parse_args(argv)
    if args.action is None:
        build_parser().error("an action is required: start or delete")
    bundle = args.bundle or os.getcwd()
    stream = shimlog.setup(bundle, args.debug)
    try:
        cfg = shimconfig.load()
        if args.action == "start":
            options = read_options()
            if serve is None:
                start(args, cfg, options, report)
                return 0
            return serve(args, cfg, options, report) or 0
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
