"""Content digests (``algorithm:hex``): validation, hashing and blob file names.

Only the algorithms the OCI image spec registers are accepted (``sha256``, ``sha512``); anything
else is an :class:`InvalidDigest` naming the bad string.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

from kata_ipu.errors import InvalidArgument

_HEX_LEN = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"^[a-f0-9]+$")


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


class InvalidDigest(InvalidArgument):
    """A digest string is not ``sha256:<64 hex>`` or ``sha512:<128 hex>``."""

    def __init__(self, digest: str, why: str) -> None:
        super().__init__(f"invalid digest {digest!r}: {why}")
        self.digest = digest


def split_digest(digest: str) -> tuple[str, str]:
    """Validate ``digest`` and return ``(algorithm, hex)``."""
    if not isinstance(digest, str):
        raise InvalidDigest(repr(digest), "not a string")
    algo, sep, hexd = digest.partition(":")
    if not sep:
        raise InvalidDigest(digest, "missing 'algorithm:' prefix")
    if algo not in _HEX_LEN:
        raise InvalidDigest(digest, f"unsupported algorithm {algo!r}")
    if len(hexd) != _HEX_LEN[algo] or not _HEX.match(hexd):
        raise InvalidDigest(digest, f"expected {_HEX_LEN[algo]} lowercase hex characters")
    return algo, hexd


def validate_digest(digest: str) -> str:
    split_digest(digest)
    return digest


def new_hasher(digest: str) -> Hasher:
    """A fresh hasher for the algorithm of ``digest``."""
    algo, _ = split_digest(digest)
    return hashlib.new(algo)


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
