"""Unix socket paths and peers: claim a path for a server, check who is calling.

A server about to bind ``path`` calls :func:`clear_stale_socket`: a socket file whose server
is gone (``connect`` is refused) is unlinked, a live server is reported and left alone, and
a path that is not a socket is reported too; each caller raises its own error for the last
two. :func:`is_serving` is the probe alone. :func:`peer_credentials` reads ``SO_PEERCRED``
(the kernel's record of the connecting process, not anything the peer says).
"""

from __future__ import annotations

import enum
import os
import socket
import stat
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


class PathState(enum.Enum):
    """What :func:`clear_stale_socket` found at a path."""

    FREE = "free"  # nothing there, or a stale socket that has been removed
    SERVING = "serving"  # a server accepts connections there: leave it alone
    NOT_A_SOCKET = "not a socket"  # something else is there: never removed


def is_serving(path: str, kind: int = socket.SOCK_STREAM) -> bool:
    """A server accepts ``kind`` connections at ``path`` (any failure to connect: no)."""
    with socket.socket(socket.AF_UNIX, kind) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def clear_stale_socket(path: str, kind: int = socket.SOCK_STREAM) -> PathState:
    """Make ``path`` free for a new server unless something lives there.

    Only a refused connection (or the file vanishing meanwhile) makes a socket stale; any
    other failure to probe (``EACCES``...) propagates, since unlinking what cannot be probed
    could take a live server's path.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return PathState.FREE
    if not stat.S_ISSOCK(st.st_mode):
        return PathState.NOT_A_SOCKET
    with socket.socket(socket.AF_UNIX, kind) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        else:
            return PathState.SERVING
    try:
        os.unlink(path)  # stale: its server is gone
    except FileNotFoundError:
        pass
    return PathState.FREE


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The process at the other end of a unix connection, as the kernel recorded it."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """``SO_PEERCRED`` of a connected unix socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid, uid, gid)
