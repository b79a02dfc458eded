"""systemd readiness (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``.

Used by every long-running program of the project (kata-ipud, kata-ipu-shimd, the
snapshotter), so it lives on the ground floor. kata-ipud sends ``READY=1`` only after state
recovery, so units ordered ``Before=`` it (e.g. containerd) start against a consistent IPU;
``STOPPING=1`` on SIGTERM; ``STATUS=`` lines in between. Without ``$NOTIFY_SOCKET`` (not
under systemd) every call is a no-op."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("kata_ipu.osutil.notify")


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` lines; returns True when a notify socket received them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("ignoring NOTIFY_SOCKET %r: not a unix socket path", address)
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", address, exc)
            return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", f"MAINPID={os.getpid()}", *((f"STATUS={status}",) if status else ()))


def stopping() -> bool:
    return notify("STOPPING=1")
