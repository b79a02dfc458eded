"""The wire format between the shim's ``start`` and the resident shim server (kata-ipu-shimd).

containerd runs ``containerd-shim-kata-ipu-v2 ... start`` for every new container (or pod) and
waits for it. Paying Python's imports of asyncio, protobuf and the ttrpc code on each of those
runs costs ~100 ms, so :mod:`shim_hooks.launcher` imports nothing but this module and hands
the whole invocation to the server, which has everything loaded and forks:

* one ``SOCK_SEQPACKET`` message from the launcher: NUL-separated fields ``MAGIC``, the argv
  count, the argv, the environment count, ``KEY=VALUE`` entries, the working directory; its
  three ancillary ``SCM_RIGHTS`` descriptors are the launcher's stdin (containerd's runtime
  options), stdout (where containerd reads the address) and stderr;
* one message back: the exit status in ASCII digits, sent once the forked child has written
  the address (or its error) on those descriptors and closed them.

No field may contain a NUL byte: argv, the environment and paths are C strings already. The
peer's pid and uid come from ``SO_PEERCRED``, never from the message.

This module is imported on the launcher's hot path: standard library built-ins only, no
``typing`` or ``dataclasses`` (each costs milliseconds to import).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

MAGIC = b"kata-ipu-shim-start/1"
MAX_MESSAGE = 1 << 20  # a bigger request is malformed (the environment is a few KiB)
FDS = 3  # stdin, stdout, stderr


class HandoffError(ValueError):
    """A malformed hand-off message."""


class Request:
    """A decoded ``start`` hand-off: what the launcher was run with."""

    __slots__ = ("argv", "cwd", "env")

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Request) and (self.argv, self.env, self.cwd) ==
                (other.argv, other.env, other.cwd))

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass(eq=True)

    def __repr__(self) -> str:
        return f"Request(argv={self.argv!r}, cwd={self.cwd!r}, env=<{len(self.env)} entries>)"


def encode(argv: Sequence[str | bytes], env: Mapping[bytes, bytes], cwd: bytes) -> bytes:
    """The launcher's message (``os.environb``-style bytes, so nothing is re-encoded)."""
    args = [a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a for a in argv]
    fields = [MAGIC, str(len(args)).encode(), *args, str(len(env)).encode(),
              *(k + b"=" + v for k, v in env.items()), cwd]
    for f in fields:
        if b"\0" in f:
            raise HandoffError("a NUL byte in an argument, the environment or the cwd")
    return b"\0".join(fields)


def _count(raw: bytes, what: str) -> int:
    if not raw.isdigit() or len(raw) > 6:
        raise HandoffError(f"bad {what} count {raw[:16]!r}")
    return int(raw)


def decode(data: bytes) -> Request:
    """The server's side of :func:`encode`; raises :class:`HandoffError` naming the problem."""
    if len(data) > MAX_MESSAGE:
        raise HandoffError(f"message of {len(data)} bytes is larger than {MAX_MESSAGE}")
    fields = data.split(b"\0")
    if fields[0] != MAGIC:
        raise HandoffError(f"not a kata-ipu start hand-off (magic {fields[0][:32]!r})")
    try:
        n_argv = _count(fields[1], "argv")
        argv = fields[2:2 + n_argv]
        n_env = _count(fields[2 + n_argv], "environment")
        env_fields = fields[3 + n_argv:3 + n_argv + n_env]
        rest = fields[3 + n_argv + n_env:]
    except IndexError:
        raise HandoffError("truncated message") from None
    if len(argv) != n_argv or len(env_fields) != n_env or len(rest) != 1:
        raise HandoffError(f"field count mismatch ({len(fields)} fields for {n_argv} "
                           f"arguments and {n_env} environment entries)")
    if not argv:
        raise HandoffError("empty argv")
    env: dict[str, str] = {}
    for entry in env_fields:
        key, sep, value = entry.partition(b"=")
        if not sep or not key:
            raise HandoffError(f"environment entry without a name: {entry[:32]!r}")
        env[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    cwd = rest[0].decode("utf-8", "surrogateescape")
    if not cwd.startswith("/"):
        raise HandoffError(f"working directory {cwd!r} is not absolute")
    return Request([a.decode("utf-8", "surrogateescape") for a in argv], env, cwd)


def encode_status(rc: int) -> bytes:
    return str(rc).encode()


def decode_status(data: bytes) -> int | None:
    """The exit status, or None when the reply is not one (the child died first)."""
    return int(data) if data.isdigit() and len(data) <= 3 else None
