"""Transport-level errors of the ttrpc implementation.

::

    KataIpuError (kata_ipu.errors)
     ├── Unavailable
     │    └── ConnectionClosed       the connection dropped; every pending call gets this
     ├── InvalidArgument
     │    └── ProtocolError          the peer sent bytes that are not ttrpc
     │         └── WireError         a protobuf envelope could not be decoded
     └── ResourceExhausted
          └── OversizedMessage       a message exceeds the 4 MiB ttrpc limit

Call failures reported by the peer (a Response with a non-OK status) are raised as the project
error class for that code (``kata_ipu.errors.error_for_code``), carrying ``.code`` and the
peer's message unchanged.
"""

from __future__ import annotations

from kata_ipu import protowire
from kata_ipu.errors import InvalidArgument, ResourceExhausted, Unavailable


class ProtocolError(InvalidArgument):
    """The byte stream violates the ttrpc framing or envelope rules."""


class WireError(ProtocolError, protowire.WireError):
    """A protobuf envelope (Request/Response/Status) is malformed."""


class ConnectionClosed(Unavailable):
    """The connection is closed; raised for every call pending or issued after that."""

    def __init__(self, message: str = "ttrpc: closed") -> None:
        super().__init__(message)


class OversizedMessage(ResourceExhausted):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"message length {length} exceed maximum message size of {limit}")
        self.length = length
        self.limit = limit
