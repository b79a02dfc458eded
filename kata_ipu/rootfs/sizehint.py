"""Cheap guesses of a layer's uncompressed size, to format the build image close to its final
size before anything is decompressed.

Why: the loop writer formats first and shrinks at the end. Shrinking an ext4 image means
moving every block that landed above the new end, which costs as much as copying those
files again (~0.1 s for 64 MiB); a first size close to the honest one makes the final
``resize2fs`` nearly free. A guess that is too small is still safe: the writer runs out of
room and the builder starts over at the maximum size.

Sources of a hint, per compression:

* ``none``: the blob size is the tar size.
* ``gzip``: the trailer's ISIZE (RFC 1952: uncompressed length of the *last member*, mod
  2**32). Wrong for multi-member streams and for layers of 4 GiB and more, so a value below
  what even incompressible data would give is treated as unknown.
* ``zstd``: the first frame's content size, when the frame header records it.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import BinaryIO

import zstandard

log = logging.getLogger("kata_ipu.rootfs")

GZIP_TAIL = 4
"""Bytes at the end of a gzip blob that hold the hint."""
ZSTD_HEAD = 18
"""Bytes at the start of a zstd blob that hold the hint (the longest frame header)."""

# Deflate/zstd never shrink data by more than a few bytes per block, so a hint below this
# fraction of the compressed size cannot be the real uncompressed size.
_MIN_RATIO = 0.9


def _plausible(hint: int, compressed: int) -> int | None:
    return hint if hint >= compressed * _MIN_RATIO else None


def from_gzip_tail(tail: bytes, compressed: int) -> int | None:
    """Hint from the last :data:`GZIP_TAIL` bytes of a gzip blob of ``compressed`` bytes."""
    if len(tail) != GZIP_TAIL or compressed < 18:  # 18: gzip header + trailer
        return None
    return _plausible(struct.unpack("<I", tail)[0], compressed)


def from_zstd_head(head: bytes, compressed: int) -> int | None:
    """Hint from the first :data:`ZSTD_HEAD` (or fewer) bytes of a zstd blob."""
    try:
        size = zstandard.frame_content_size(head)
    except zstandard.ZstdError:
        return None
    return _plausible(size, compressed) if size >= 0 else None


def uncompressed_hint(blob: BinaryIO, compression: str, compressed: int) -> int | None:
    """Best guess of the tar size of one complete layer blob (a seekable reader)."""
    try:
        if compression == "none":
            return compressed
        if compression == "gzip" and compressed >= GZIP_TAIL:
            blob.seek(compressed - GZIP_TAIL, os.SEEK_SET)
            return from_gzip_tail(blob.read(GZIP_TAIL), compressed)
        if compression == "zstd":
            blob.seek(0)
            return from_zstd_head(blob.read(ZSTD_HEAD), compressed)
    except OSError:
        log.debug("no size hint", extra={"compression": compression}, exc_info=True)
    return None
