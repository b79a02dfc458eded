"""Errors of the rootfs builder, each derived from one semantic class of :mod:`kata_ipu.errors`.

::

    InvalidArgument
     ├── PathEscape            an entry name, link or whiteout that would leave the image root
     ├── BadLayer              a tar entry kata-ipu cannot apply (bad type, parent not a dir, ...)
     └── UnsupportedMedia      a layer media type or compression we do not handle
    NotFound
     └── BlobNotFound          the image source has no such blob/manifest
    DataLoss
     ├── BlobDigestMismatch    compressed blob does not hash to its descriptor digest/size
     ├── DiffIdMismatch        uncompressed layer does not hash to the config's diff_id
     └── CorruptLayer          truncated or invalid compressed stream or tar
    ResourceExhausted
     ├── LayerTooLarge         decompressed bytes exceed the configured limit (bombs)
     └── ImageTooLarge         the unpacked tree does not fit the configured maximum image size
    Cancelled
     └── BuildCancelled        the build was cancelled; nothing was left behind
"""

from __future__ import annotations

from kata_ipu.errors import (
    Cancelled,
    DataLoss,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)


class PathEscape(InvalidArgument):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"refusing path {path!r}: {reason}")
        self.path = path
        self.reason = reason


class BadLayer(InvalidArgument):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot apply layer entry {path!r}: {reason}")
        self.path = path
        self.reason = reason


class UnsupportedMedia(InvalidArgument):
    def __init__(self, media_type: str) -> None:
        super().__init__(f"unsupported layer media type {media_type!r}")
        self.media_type = media_type


class BlobNotFound(NotFound):
    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest} not found in image source")
        self.digest = digest


class BlobDigestMismatch(DataLoss):
    def __init__(self, expected: str, actual: str, expected_size: int, actual_size: int) -> None:
        super().__init__(
            f"blob digest mismatch: expected {expected} ({expected_size} bytes), "
            f"got {actual} ({actual_size} bytes)"
        )
        self.expected = expected
        self.actual = actual
        self.expected_size = expected_size
        self.actual_size = actual_size


class DiffIdMismatch(DataLoss):
    def __init__(self, layer: int, expected: str, actual: str) -> None:
        super().__init__(
            f"layer {layer}: uncompressed digest {actual} does not match diff_id {expected}"
        )
        self.layer = layer
        self.expected = expected
        self.actual = actual


class CorruptLayer(DataLoss):
    def __init__(self, reason: str) -> None:
        super().__init__(f"corrupt layer: {reason}")
        self.reason = reason


class LayerTooLarge(ResourceExhausted):
    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} exceeds the limit of {limit} bytes")
        self.limit = limit


class ImageTooLarge(ResourceExhausted):
    def __init__(self, needed: int, maximum: int) -> None:
        super().__init__(
            f"image needs {needed} bytes but the configured maximum is {maximum} bytes"
        )
        self.needed = needed
        self.maximum = maximum


class BuildCancelled(Cancelled):
    def __init__(self) -> None:
        super().__init__("rootfs build cancelled")
