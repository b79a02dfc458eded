"""The frame decoder on arbitrary byte streams and fragmentations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kata_ipu.ttrpc.frame import (
    HEADER_LENGTH,
    Frame,
    FrameDecoder,
    OversizeFrame,
    encode_frame,
)

LIMIT = 64  # a small limit makes oversize frames cheap to generate; the logic is the same


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return chunks


frames = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255),
              st.binary(max_size=LIMIT)),
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(frames, st.lists(st.integers(min_value=0), max_size=12))
def test_any_fragmentation_yields_the_same_frames(
    spec: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(*f) for f in spec)
    dec = FrameDecoder(limit=LIMIT)
    out: list[Frame | OversizeFrame] = []
    for chunk in _split(stream, cuts):
        out.extend(dec.feed(chunk))
    assert out == [Frame(*f) for f in spec]
    assert dec.buffered == 0


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 2**31), st.binary(max_size=LIMIT)),
                max_size=6),
       st.lists(st.integers(min_value=0), max_size=12))
def test_oversize_frames_are_skipped_and_stream_stays_in_sync(
    spec: list[tuple[bool, int, bytes]], cuts: list[int]
) -> None:
    stream = b""
    expected: list[Frame | OversizeFrame] = []
    for oversize, sid, body in spec:
        if oversize:
            body = body + b"\x00" * (LIMIT + 1 - len(body))
            expected.append(OversizeFrame(sid, 1, 0, len(body)))
        else:
            expected.append(Frame(sid, 1, 0, body))
        stream += encode_frame(sid, 1, 0, body)
    dec = FrameDecoder(limit=LIMIT)
    out: list[Frame | OversizeFrame] = []
    for chunk in _split(stream, cuts):
        out.extend(dec.feed(chunk))
        assert dec.buffered <= HEADER_LENGTH + LIMIT
    assert out == expected


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_arbitrary_bytes_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    dec = FrameDecoder(limit=LIMIT)
    for chunk in chunks:
        for frame in dec.feed(chunk):
            if isinstance(frame, Frame):
                assert len(frame.data) <= LIMIT
        assert dec.buffered <= HEADER_LENGTH + LIMIT


def test_real_limit_huge_announced_length_is_not_buffered() -> None:
    dec = FrameDecoder()
    # A header announcing 4 GiB - 1: the decoder must neither wait for it nor buffer it.
    header = (2**32 - 1).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x01\x00"
    assert dec.feed(header) == [OversizeFrame(1, 1, 0, 2**32 - 1)]
    for _ in range(100):
        assert dec.feed(b"\x00" * 65536) == []
        assert dec.buffered == 0
