"""Listen/dial addresses: ``unix:///abs/path``, a bare absolute path, or ``tcp://HOST:PORT``."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from kata_ipu.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


Address = UnixAddress | TcpAddress


def parse_address(text: str) -> Address:
    """Parse an address, naming the bad part on error."""
    if text.startswith("/"):
        return UnixAddress(text)
    if text.startswith("unix://"):
        path = text[len("unix://"):]
        if not path.startswith("/"):
            raise InvalidArgument(f"address {text!r}: unix socket path must be absolute")
        return UnixAddress(path)
    if text.startswith("tcp://"):
        parsed = urllib.parse.urlsplit(text)
        try:
            port = parsed.port
        except ValueError as exc:
            raise InvalidArgument(f"address {text!r}: bad port") from exc
        if not parsed.hostname or port is None:
            raise InvalidArgument(f"address {text!r}: expected tcp://HOST:PORT")
        if parsed.path not in ("", "/"):
            raise InvalidArgument(f"address {text!r}: unexpected path {parsed.path!r}")
        return TcpAddress(parsed.hostname, port)
    raise InvalidArgument(
        f"address {text!r}: unknown scheme (expected unix:///path or tcp://HOST:PORT)"
    )
