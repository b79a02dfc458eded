"""``kata-ipu-shimd``: the resident parent of the shim's ``start`` (a fork server).

containerd runs ``containerd-shim-kata-ipu-v2 start`` for every container and waits for the
address it prints. A fresh Python process spends ~100 ms importing asyncio, protobuf and the
ttrpc code before doing anything; this server has them imported once, and every ``start`` is
a ``fork()`` of it instead (docs/adr/0004-resident-shim-server.md).

Lifecycle::

    preload → listen (SOCK_SEQPACKET, mode 0600) → READY=1 → serving
    serving: keep one spare (a pre-forked child) accepting; when it takes a ``start``, fork
             the next one ``refill_delay`` later (at once if a start waits for it); run each
             ``delete`` a spare passes on in a child of its own
    spare:   warm up (at nice 19: a start's code path, its event loop and worker thread, a
             connection to kata-ipud) → accept → peer check (SO_PEERCRED: our uid) → receive
             the hand-off (one message + the launcher's stdin/stdout/stderr,
             :mod:`shim_hooks.handoff`) →
             ``start``: become the proxy | ``delete``: pass it on to the server (the
             connection and the descriptors), stay a spare | refused: log, stay a spare
    SIGTERM/SIGINT → stop accepting, remove the socket, exit 0

The children are the proxies of live containers. Stopping or killing the server does not touch
them (the systemd unit says ``KillMode=process``, as containerd's own does): they keep serving
containerd and exit with their delegate; a new server only serves new ``start``\\ s.

A child becomes what containerd would have started: a new session, the launcher's stdio,
environment, working directory, umask, rlimits, OOM score, nice value and cgroups
(:mod:`procctx`). For ``start`` it then runs the shim's ``start`` (:func:`shim_hooks.shim.main`
with :func:`~shim_hooks.shim.serve_in_place`), writes the address on the launcher's stdout,
closes the launcher's descriptors, sends the exit status, and goes on serving as the proxy.
``delete`` (which containerd runs after every container) is run the same way, by a child
the server forks for it, which exits. A spare never forks: a fork marks every page of the
forking process copy-on-write again, and the start that spare took next paid a page fault
(≈ 5 µs in a VM) for every page it wrote — ≈ 1,400 per start instead of ≈ 360, several
milliseconds. A bad hand-off is logged and refused; the server keeps serving.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from kata_ipu import log as jsonlog
from kata_ipu.osutil import notify, unixsock
from shim_hooks import handoff, procctx
from shim_hooks.launcher import DEFAULT_SERVER

log = logging.getLogger("shim_hooks.server")

RECEIVE_TIMEOUT = 5.0  # the launcher sends right after connecting
SPARE_FAILURES = 5  # spares dying idle in a row before the server slows down
SPARE_BACKOFF = 2.0
# seconds between a spare taking a start and its replacement's fork (sooner when another start
# is already waiting and no spare is idle): see Server.serve_forever
REFILL_DELAY = 0.2
BACKLOG = 128


class ServerError(Exception):
    """The server cannot start (its socket is in use, its directory cannot be made...)."""


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(conn: socket.socket) -> Peer:
    cred = unixsock.peer_credentials(conn)
    return Peer(cred.pid, cred.uid, cred.gid)


def preload() -> None:
    """Import what a ``start`` and its proxy need, once, before any fork."""
    import asyncio  # noqa: F401, PLC0415

    from shim_hooks import hostmount, proxy, shim  # noqa: F401, PLC0415

    hostmount.libc()  # the C library's mount(2), looked up once
    # Objects that live as long as the server would be touched by the children's collector
    # and copied page by page; frozen, they stay shared.
    gc.collect()
    gc.freeze()


def bind(path: str) -> socket.socket:
    """Listen on ``path``, replacing a stale socket file but never a live server."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        state = unixsock.clear_stale_socket(path, socket.SOCK_SEQPACKET)  # a dead server's
        if state is not unixsock.PathState.FREE:
            raise ServerError(f"{path}: another kata-ipu-shimd is serving there"
                              if state is unixsock.PathState.SERVING
                              else f"{path}: exists and is not a socket")
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def receive(conn: socket.socket, nfds: int = handoff.FDS
            ) -> tuple[bytes, handoff.Request, list[int]]:
    """One hand-off message (raw and decoded) and its ``nfds`` descriptors; closes any
    received fd on error."""
    conn.settimeout(RECEIVE_TIMEOUT)
    data, ancdata, flags, _ = conn.recvmsg(handoff.MAX_MESSAGE + 1,
                                           socket.CMSG_SPACE(nfds * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += list(struct.unpack(f"{usable // 4}i", payload[:usable]))
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise handoff.HandoffError("message or descriptors truncated")
        if len(fds) != nfds:
            raise handoff.HandoffError(f"{len(fds)} descriptors instead of {nfds}")
        return data, handoff.decode(data), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class ShimServer:
    """Keeps ``spares`` pre-forked children waiting on ``path``; each takes one ``start``.

    A child forked only when a ``start`` arrives would spend milliseconds on copy-on-write
    faults as it first touches the interpreter's objects; a spare takes those (and warms the
    code path) while idle. Spares accept on the shared listening socket themselves; the one
    that gets a start tells the server (its pid on the ``taken`` pipe), which forks its
    replacement (after ``refill_delay``: :meth:`serve_forever`); a ``delete`` it passes on to
    the server (the ``relay`` socket pair), which forks a child to run it. A spare exits when
    the server is gone (EOF on the ``alive`` pipe).
    """

    def __init__(self, path: str, spares: int = 1, *,
                 refill_delay: float = REFILL_DELAY) -> None:
        self.path = path
        self.spares = max(1, spares)
        self.refill_delay = max(0.0, refill_delay)
        self._sock: socket.socket | None = None
        self._stopping = False
        self._idle: set[int] = set()
        self._taken_r = self._taken_w = self._alive_r = self._alive_w = -1
        self._wake_r = self._wake_w = -1
        # spares pass each `delete` to the server through this pair (the hand-off's message,
        # then the launcher's connection and descriptors)
        self._relay_r: socket.socket | None = None
        self._relay_w: socket.socket | None = None
        self._idle_deaths = 0  # spares that died idle since one last served
        self.children = 0  # forked so far (for the log)

    # -- lifecycle ------------------------------------------------------------------------
    def listen(self) -> None:
        preload()
        self._sock = bind(self.path)
        self._taken_r, self._taken_w = os.pipe2(os.O_CLOEXEC)
        self._alive_r, self._alive_w = os.pipe2(os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._relay_r, self._relay_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # reaped in the loop (wake-up fd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        log.info("kata-ipu-shimd serving", extra={"socket": self.path, "pid": os.getpid(),
                                                  "spares": self.spares})

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._sock.close()
        self._sock = None
        # Idle spares see EOF on the alive pipe and exit; one that has just accepted a start
        # no longer watches it and carries on (a signal could hit it mid-start).
        os.close(self._alive_w)
        self._alive_w = -1
        deadline = time.monotonic() + 5
        while self._idle and time.monotonic() < deadline:
            time.sleep(0.01)
            self._reap()
        # deletes the spares passed on and nobody ran yet still run
        assert self._relay_r is not None
        while _pending(self._relay_r):
            self._run_relayed()
        for fd in (self._taken_r, self._taken_w, self._alive_r, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        for relay in (self._relay_r, self._relay_w):
            if relay is not None:
                relay.close()
        log.info("kata-ipu-shimd stopped", extra={"children": self.children})

    def serve_forever(self) -> None:
        """Fork spares, reap children, until stopped.

        The replacement of a spare that took a ``start`` is forked ``refill_delay`` later,
        not at once: the fork and the new spare's warm-up would run on the CPUs exactly while
        that container starts (at nice 19 the warm-up still takes an idle CPU the start's
        next step wants a moment later). A ``start`` that arrives meanwhile with no spare idle
        (a burst) gets its spare forked as soon as it connects.
        """
        assert self._sock is not None, "listen() first"
        refill_at = 0.0  # when to top the spares up
        while not self._stopping:
            missing = self.spares - len(self._idle)
            now = time.monotonic()
            if missing > 0 and (now >= refill_at or
                                (not self._idle and _pending(self._sock))):
                for _ in range(missing):
                    if self._stopping:
                        break
                    if self._idle_deaths >= SPARE_FAILURES:
                        # spares die before serving anything (a broken install?): do not spin
                        log.error("spares keep exiting while idle; retrying in %.0f s",
                                  SPARE_BACKOFF)
                        time.sleep(SPARE_BACKOFF)
                        self._idle_deaths = 0
                    self._fork_spare()
                continue
            assert self._relay_r is not None
            watch = [self._taken_r, self._wake_r, self._relay_r.fileno()]
            timeout = None
            if missing > 0:
                timeout = max(0.0, refill_at - now)
                if not self._idle:
                    watch.append(self._sock.fileno())  # a start waiting for a spare
            readable, _, _ = select.select(watch, [], [], timeout)
            # taken first: a spare that served a very short container may already be gone
            if self._taken_r in readable:
                for (pid,) in struct.iter_unpack("i", _read_whole(self._taken_r)):
                    self._idle.discard(pid)
                    self._idle_deaths = 0
                refill_at = time.monotonic() + self.refill_delay
            if self._relay_r.fileno() in readable:
                self._run_relayed()
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
                self._reap()

    def _reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid <= 0:
                    break
                if pid in self._idle:
                    self._idle.discard(pid)
                    if not self._stopping:
                        self._idle_deaths += 1
                        log.warning("a spare exited while idle",
                                    extra={"child": pid, "status": status})

    def _run_relayed(self) -> None:
        """Run a ``delete`` a spare passed on, in a child of the server (reaped by
        :meth:`_reap`)."""
        assert self._relay_r is not None
        try:
            _, request, fds = receive(self._relay_r, handoff.FDS + 1)
        except (handoff.HandoffError, OSError) as exc:
            log.error("a delete passed on by a spare was lost: %s", exc)
            return
        got = _relayed_connection(fds)
        if got is None:
            return
        conn, peer = got
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes: this delete fails, the server serves on
            log.error("cannot fork for a delete: %s", exc)
            pid = -1
        if pid == 0:
            rc = 1
            try:
                signal.set_wakeup_fd(-1)
                self._leave_server()
                with conn:
                    rc = _child(conn, request, fds[1:], peer)
            except BaseException:
                log.exception("delete failed")
            finally:
                os._exit(rc)
        conn.close()
        for fd in fds[1:]:
            os.close(fd)
        self.children += pid > 0

    def _leave_server(self) -> None:
        """In a child of the server that serves one hand-off: drop the server's descriptors
        (the alive pipe's write end and the socket are gone already when it is stopping)."""
        for fd in (self._taken_r, self._taken_w, self._alive_r, self._alive_w, self._wake_r,
                   self._wake_w):
            if fd >= 0:
                os.close(fd)
        for sock in (self._sock, self._relay_r, self._relay_w):
            if sock is not None:
                sock.close()

    def _fork_spare(self) -> None:
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                rc = self._spare()
            except BaseException:
                log.exception("spare failed")
            finally:
                os._exit(rc)
        self._idle.add(pid)
        self.children += 1

    # -- in a spare -------------------------------------------------------------------------
    def _spare(self) -> int:
        assert self._sock is not None
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self._taken_r, self._alive_w, self._wake_r, self._wake_w):
            os.close(fd)
        assert self._relay_r is not None
        self._relay_r.close()
        # A spare is forked right after another was taken, i.e. while a container is being
        # started: warm up at the lowest priority so as not to compete with that start, then
        # take back the server's priority (lowering a nice value needs CAP_SYS_NICE: root).
        priority = os.getpriority(os.PRIO_PROCESS, 0)
        lowered = os.geteuid() == 0
        if lowered:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        warm_up()
        if lowered:
            procctx.renice(priority)  # the warm-up started a worker thread
        self._sock.setblocking(False)
        while True:
            listening = self._sock.fileno()
            readable, _, _ = select.select([listening, self._alive_r], [], [])
            if self._alive_r in readable:
                return 0  # the server is gone: a spare serves nobody alone
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                continue  # another spare took it
            conn.setblocking(True)
            got = self._receive(conn)
            if got is None:
                conn.close()  # refused: this spare stays idle
                continue
            data, request, fds, peer = got
            if request.argv[-1] != "start":
                # `delete` runs after every container: the server runs it (a spare that
                # forked would fault on every page it writes during its next start)
                self._relay(conn, data, fds)
                continue
            break
        os.write(self._taken_w, struct.pack("i", os.getpid()))
        self._leave()
        with conn:
            return _child(conn, request, fds, peer)

    def _leave(self) -> None:
        """Let go of the server's descriptors: a proxy holding the listening socket would keep
        it connectable after the server is gone, and launchers would queue there forever."""
        assert self._sock is not None and self._relay_w is not None
        for fd in (self._taken_w, self._alive_r):
            os.close(fd)
        self._sock.close()
        self._relay_w.close()

    def _relay(self, conn: socket.socket, data: bytes, fds: list[int]) -> None:
        """Pass a hand-off to the server: its message, the connection and the descriptors
        (this spare's copies are closed). Lost, the launcher sees the connection close with
        no status and reports that."""
        assert self._relay_w is not None
        try:
            self._relay_w.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            struct.pack(f"{len(fds) + 1}i", conn.fileno(),
                                                        *fds))])
        except OSError as exc:
            log.error("cannot pass a delete on to the server: %s", exc)
        finally:
            conn.close()
            for fd in fds:
                os.close(fd)

    def _receive(self, conn: socket.socket
                 ) -> tuple[bytes, handoff.Request, list[int], Peer] | None:
        """One hand-off from ``conn``, or None (logged) when it is refused."""
        try:
            peer = peer_of(conn)
            if peer.uid != os.getuid():
                raise handoff.HandoffError(f"peer uid {peer.uid} is not {os.getuid()}")
            data, request, fds = receive(conn)
        except (handoff.HandoffError, OSError) as exc:
            log.warning("refused a start hand-off: %s", exc)
            return None
        log.debug("hand-off", extra={"peer": peer.pid, "argv": request.argv})
        return data, request, fds, peer


def _relayed_connection(fds: list[int]) -> tuple[socket.socket, Peer] | None:
    """The launcher's connection (the first of ``fds``) and its peer, or None (logged, every
    descriptor closed)."""
    conn: socket.socket | None = None
    try:
        conn = socket.socket(fileno=fds[0])
        return conn, peer_of(conn)
    except OSError as exc:
        log.error("a delete passed on by a spare was lost: %s", exc)
        if conn is not None:
            conn.close()
        else:
            os.close(fds[0])
        for fd in fds[1:]:
            os.close(fd)
        return None


def _pending(sock: socket.socket) -> bool:
    """Is a connection waiting to be accepted on the listening ``sock`` (a message to be
    read on a connected one)?"""
    readable, _, _ = select.select([sock.fileno()], [], [], 0)
    return bool(readable)


def _read_whole(fd: int) -> bytes:
    """Whole pids from the taken pipe (writes of 4 bytes are atomic)."""
    return os.read(fd, 4096)


def warm_up() -> None:
    """Run, in an idle spare, what a ``start`` runs, so that its copy-on-write faults and
    first-call costs (an event loop, a thread pool, a spawn) are paid before a container waits
    for them; then freeze what is left for the collector. The event loop and its worker
    thread stay, for the start (:func:`shim.prewarm_loop`)."""
    from shim_hooks import config, runtimeopts, shim  # noqa: PLC0415 - preloaded

    handoff.decode(handoff.encode(["warm-up", "start"], os.environb, os.getcwdb()))
    procctx.adopt(os.getpid(), dict(os.environ), os.getcwd())  # its own context: no change
    shim.build_parser().parse_args(["-namespace", "n", "-id", "i", "start"])
    cfg = None
    with contextlib.suppress(config.ConfigError):
        cfg = config.load()  # the same configuration as containerd's shims
    runtimeopts.parse(b"")
    shim.prewarm_loop(cfg.address if cfg is not None else None)
    subprocess.run(["true"], check=False)
    gc.collect()
    gc.freeze()


def _child(conn: socket.socket, request: handoff.Request, fds: list[int], peer: Peer) -> int:
    """The forked ``start``: becomes the container's proxy; returns its exit status."""
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - the process's own
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    reported = False

    def report(address: str) -> None:
        nonlocal reported
        os.write(1, address.encode())
        from shim_hooks.shim import detach_stdio  # noqa: PLC0415 - preloaded

        detach_stdio()
        with contextlib.suppress(OSError):
            conn.send(handoff.encode_status(0))
        conn.close()
        reported = True

    try:
        procctx.adopt(peer.pid, request.env, request.cwd)
    except procctx.ContextError as exc:
        os.write(2, f"kata-ipu-shimd: {exc}\n".encode())
        conn.send(handoff.encode_status(1))
        return 1
    from shim_hooks import shim  # noqa: PLC0415 - preloaded

    rc = shim.main(request.argv[1:], serve=shim.serve_in_place, report=report)
    if not reported:
        with contextlib.suppress(OSError):
            sys.stderr.flush()
            conn.send(handoff.encode_status(rc))
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-ipu-shimd",
        description="Resident fork server for containerd-shim-kata-ipu-v2 start: keeps the "
        "shim's code loaded so each container's start is a fork, not a Python start-up.")
    p.add_argument("--socket", default=os.environ.get("KATA_IPU_SHIM_SERVER") or
                   DEFAULT_SERVER, help="hand-off socket (default %(default)s; the shim "
                   "finds it there or at $KATA_IPU_SHIM_SERVER)")
    p.add_argument("--spares", type=int, default=1, metavar="N",
                   help="pre-forked children kept waiting for a start (default %(default)s)")
    p.add_argument("--refill-delay", type=float, default=REFILL_DELAY, metavar="SECONDS",
                   help="wait this long after a spare took a start before forking its "
                   "replacement, unless another start is waiting (default %(default)s)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    jsonlog.setup(getattr(logging, args.log_level.upper()), sys.stderr)
    server = ShimServer(args.socket, args.spares, refill_delay=args.refill_delay)
    try:
        server.listen()
    except (ServerError, OSError) as exc:
        log.error("kata-ipu-shimd cannot start: %s", exc)
        return 1
    notify.ready(f"serving {args.socket}")
    try:
        server.serve_forever()
    finally:
        notify.stopping()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
