"""ttrpc framing: a 10-byte big-endian header, then at most 4 MiB of data.

::

    offset 0  u32  data length (header not counted)
    offset 4  u32  stream id   (odd: client-initiated)
    offset 8  u8   message type (1 request, 2 response, 3 data)
    offset 9  u8   flags        (v1.2 streaming: 1 remote closed, 2 remote open, 4 no data)

:class:`FrameDecoder` turns an arbitrarily fragmented byte stream into frames. It never holds
more than one header plus one maximum-size body: when a header announces more than the
limit, the body is *discarded as it arrives* (not buffered) and an :class:`OversizeFrame` is
reported for that stream, so the connection stays in sync — exactly what the Go
implementation does before answering RESOURCE_EXHAUSTED on that stream.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = 10
MESSAGE_LENGTH_MAX = 4 << 20


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    NONE = 0
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizeFrame:
    """A frame whose body exceeded the limit; its body was skipped."""

    stream_id: int
    type: int
    flags: int
    length: int


def encode_frame(stream_id: int, mtype: int, flags: int, data: bytes) -> bytes:
    return HEADER.pack(len(data), stream_id, mtype, flags) + data


class FrameDecoder:
    """Incremental decoder. ``feed`` returns the frames completed by the new bytes."""

    __slots__ = ("_buf", "_discard", "_limit")

    def __init__(self, limit: int = MESSAGE_LENGTH_MAX) -> None:
        self._buf = bytearray()
        self._discard = 0  # body bytes of an oversize frame still to skip
        self._limit = limit

    @property
    def buffered(self) -> int:
        """Bytes held right now (bounded by HEADER_LENGTH + limit between feeds)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | OversizeFrame]:
        out: list[Frame | OversizeFrame] = []
        view = memoryview(data)
        if self._discard:
            skip = min(self._discard, len(view))
            self._discard -= skip
            view = view[skip:]
        if not view:
            return out
        buf = self._buf
        buf += view
        pos = 0
        end = len(buf)
        limit = self._limit
        while end - pos >= HEADER_LENGTH:
            length, sid, mtype, flags = HEADER.unpack_from(buf, pos)
            if length > limit:
                pos += HEADER_LENGTH
                avail = min(length, end - pos)
                pos += avail
                self._discard = length - avail
                out.append(OversizeFrame(sid, mtype, flags, length))
                continue
            if end - pos - HEADER_LENGTH < length:
                break
            start = pos + HEADER_LENGTH
            out.append(Frame(sid, mtype, flags, bytes(buf[start:start + length])))
            pos = start + length
        if pos:
            del buf[:pos]
        return out
