"""Entry point of ``containerd-shim-kata-ipu-v2``: hand ``start`` to kata-ipu-shimd if it runs.

containerd runs the shim binary's ``start`` on the critical path of every container. When the
resident shim server (:mod:`shim_hooks.server`) listens on ``$KATA_IPU_SHIM_SERVER`` (default
``/run/kata-ipu/shimd.sock``; an empty value turns the hand-off off), this process only sends
its argv, environment, working directory and stdio descriptors there (:mod:`shim_hooks.handoff`)
and exits with the status the server's forked child reports; the child writes the address (or
``delete``'s reply) on our stdout itself. Otherwise — no server, or anything but ``start`` and
``delete`` — it runs :func:`shim_hooks.shim.main` in this process, exactly as without a
server.

Only built-in modules are imported before that decision: the point is to not pay Python's
imports.
"""

from __future__ import annotations

import _socket  # the C module: ``socket`` itself imports enum, selectors... (milliseconds)
import os
import sys

from shim_hooks import handoff

SERVER_ENV = "KATA_IPU_SHIM_SERVER"
DEFAULT_SERVER = "/run/kata-ipu/shimd.sock"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def server_path(environ: dict[bytes, bytes] | None = None) -> str:
    env = os.environb if environ is None else environ
    value = env.get(SERVER_ENV.encode())
    return DEFAULT_SERVER if value is None else value.decode("utf-8", "surrogateescape")


def wants_handoff(argv: Sequence[str]) -> bool:
    """``start`` (on every container's critical path) and ``delete`` (containerd runs it each
    time a connection to the shim closes, i.e. after every container)."""
    return bool(argv) and argv[-1] in ("start", "delete")


def handoff_start(path: str, argv: Sequence[str]) -> int | None:
    """Run ``start`` in the server; None when there is no server to ask (run it here)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None  # no server: nothing was sent, nothing was started
        message = handoff.encode([sys.executable, *argv], os.environb, os.getcwdb())
        fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in (0, 1, 2))
        sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        # From here on the server owns the start: never fall back (the delegate may run).
        status = handoff.decode_status(sock.recv(16))
    except OSError as exc:
        os.write(2, f"containerd-shim-kata-ipu-v2: kata-ipu-shimd at {path}: {exc}\n".encode())
        return 1
    finally:
        sock.close()
    if status is None:
        os.write(2, f"containerd-shim-kata-ipu-v2: kata-ipu-shimd at {path} did not finish "
                    "the start (see its log)\n".encode())
        return 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if wants_handoff(args):
        path = server_path()
        if path:
            rc = handoff_start(path, args)
            if rc is not None:
                return rc
    from shim_hooks import shim  # noqa: PLC0415 - the whole point: only without a server

    return shim.main(args)


if __name__ == "__main__":
    sys.exit(main())
