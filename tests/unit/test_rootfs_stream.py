"""The streaming half of layer handling, no root needed: blob verification, gzip (multi-member)
/ zstd / none decompression, diff_id hashing, bomb limits, truncation; and entry-name refusal."""

from __future__ import annotations

import gzip
import hashlib
import io
import os

import pytest
import zstandard

from kata_ipu.rootfs.errors import (
    BlobDigestMismatch,
    CorruptLayer,
    DiffIdMismatch,
    LayerTooLarge,
    PathEscape,
)
from kata_ipu.rootfs.resolve import split_entry_name
from kata_ipu.rootfs.tarstream import (
    DiffIdReader,
    PrefetchReader,
    VerifiedReader,
    decompressor,
)
from kata_ipu.testing.ocibuild import LayerBuilder


def _pipeline(blob: bytes, compression: str, diff_id: str, limit: int = 1 << 30) -> bytes:
    raw = io.BytesIO(blob)
    v = VerifiedReader(raw, "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob))
    r = DiffIdReader(decompressor(compression, v), layer=0, diff_id=diff_id, limit=limit)
    out = b""
    while chunk := r.read(7919):
        out += chunk
    r.finish()
    v.finish()
    return out


@pytest.mark.parametrize("compression", ["gzip", "gzip-multimember", "zstd", "none"])
def test_decompress_and_verify(compression: str) -> None:
    tar = LayerBuilder().file("a", os.urandom(100_000)).file("b", b"b" * 300_000).build()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    if compression == "gzip":
        blob = gzip.compress(tar)
    elif compression == "gzip-multimember":
        blob = gzip.compress(tar[:5000]) + gzip.compress(tar[5000:])
        compression = "gzip"
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(tar)
    else:
        blob = tar
    assert _pipeline(blob, compression, diff_id) == tar


def test_diff_id_mismatch_names_expected_and_actual() -> None:
    tar = LayerBuilder().file("a", b"a").build()
    with pytest.raises(DiffIdMismatch) as ei:
        _pipeline(gzip.compress(tar), "gzip", "sha256:" + "0" * 64)
    assert ei.value.expected == "sha256:" + "0" * 64
    assert ei.value.actual == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_truncated_gzip_is_corrupt() -> None:
    tar = LayerBuilder().file("a", os.urandom(50_000)).build()
    blob = gzip.compress(tar)[:-100]
    with pytest.raises(CorruptLayer, match="truncated gzip"):
        _pipeline(blob, "gzip", "sha256:" + hashlib.sha256(tar).hexdigest())


def test_bomb_stops_at_limit() -> None:
    blob = gzip.compress(b"\0" * (64 << 20), compresslevel=1)
    assert len(blob) < (1 << 20)
    with pytest.raises(LayerTooLarge):
        _pipeline(blob, "gzip", "sha256:" + "0" * 64, limit=8 << 20)


@pytest.mark.parametrize(("name", "reason"), [
    ("a/../b", "'..'"), ("../x", "'..'"), ("a\x00b", "NUL"),
    ("d/" * 2100, "PATH_MAX"), ("n" * 300, "NAME_MAX"),
])
def test_entry_names_refused(name: str, reason: str) -> None:
    with pytest.raises(PathEscape, match=reason):
        split_entry_name(name)


def test_entry_names_normalized() -> None:
    assert split_entry_name("./a//b/./c/") == ("a", "b", "c")
    assert split_entry_name("/etc/passwd") == ("etc", "passwd")
    assert split_entry_name("./") == ()


def test_blob_longer_than_descriptor_is_refused() -> None:
    blob = gzip.compress(b"x" * 1000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    v = VerifiedReader(io.BytesIO(blob + b"trailing"), digest, len(blob))
    with pytest.raises(BlobDigestMismatch):
        v.finish()


def test_prefetch_reader_passes_data_and_errors_through() -> None:
    data = os.urandom(3 << 20)
    r = PrefetchReader(io.BytesIO(data))
    try:
        assert r.read(512) == data[:512]
        r.seek(1 << 20)
        assert r.tell() == 1 << 20
        rest = b""
        while chunk := r.read(700_000):
            rest += chunk
        assert rest == data[1 << 20:]
    finally:
        r.close()
    bad = PrefetchReader(DiffIdReader(io.BytesIO(bytes(4 << 20)), layer=0,
                                      diff_id="sha256:" + "0" * 64, limit=1 << 20))
    try:
        with pytest.raises(LayerTooLarge):
            while bad.read(1 << 20):
                pass
    finally:
        bad.close()
