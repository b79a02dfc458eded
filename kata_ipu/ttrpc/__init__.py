"""containerd's ttrpc protocol in asyncio: a client, a server and the wire format.

Public API::

    client = await Client.connect("unix:///run/x.sock")
    reply = await client.call("pkg.Service", "Method", payload, timeout=5, metadata=md)

    server = Server()
    server.register("pkg.Service", {"Method": handler})   # async handler(ctx, payload) -> bytes
    await server.listen("unix:///run/x.sock")
    await server.shutdown()

See :mod:`kata_ipu.ttrpc.frame` and :mod:`kata_ipu.ttrpc.wire` for the wire format and
:mod:`kata_ipu.ttrpc.service` for protobuf-typed handlers.
"""

from kata_ipu.ttrpc.address import Address, TcpAddress, UnixAddress, parse_address
from kata_ipu.ttrpc.client import Client
from kata_ipu.ttrpc.errors import ConnectionClosed, OversizedMessage, ProtocolError, WireError
from kata_ipu.ttrpc.metadata import NAMESPACE_KEY, Metadata
from kata_ipu.ttrpc.server import CallContext, Handler, Server, UnixListener
from kata_ipu.ttrpc.service import unary
from kata_ipu.ttrpc.streams import ClientStream, ServerStream, StreamMethod

__all__ = [
    "NAMESPACE_KEY",
    "Address",
    "CallContext",
    "Client",
    "ClientStream",
    "ConnectionClosed",
    "Handler",
    "Metadata",
    "OversizedMessage",
    "ProtocolError",
    "Server",
    "ServerStream",
    "StreamMethod",
    "TcpAddress",
    "UnixAddress",
    "UnixListener",
    "WireError",
    "parse_address",
    "unary",
]
