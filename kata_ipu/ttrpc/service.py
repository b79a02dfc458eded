"""Protobuf-typed handlers on top of the bytes-level server.

``unary(RequestType, fn)`` turns ``async fn(ctx, request) -> response message`` into a
:data:`~kata_ipu.ttrpc.server.Handler`. A payload that does not parse as ``RequestType`` is
answered INTERNAL ``ttrpc: error unmarshalling payload: ...`` (the Go server's wording).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from kata_ipu.errors import Internal
from kata_ipu.ttrpc.server import CallContext, Handler

Req = TypeVar("Req")
Req_co = TypeVar("Req_co", covariant=True)


class _Parser(Protocol[Req_co]):
    def FromString(self, data: bytes, /) -> Req_co: ...


class _Serializable(Protocol):
    def SerializeToString(self) -> bytes: ...


def unary(
    request_type: _Parser[Req],
    fn: Callable[[CallContext, Req], Awaitable[_Serializable]],
) -> Handler:
    async def handler(ctx: CallContext, payload: bytes) -> bytes:
        try:
            request = request_type.FromString(payload)
        except Exception as exc:
            raise Internal(f"ttrpc: error unmarshalling payload: {exc}") from exc
        response = await fn(ctx, request)
        return response.SerializeToString()

    return handler
