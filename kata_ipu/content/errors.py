"""Errors of the content store, each derived from a :mod:`kata_ipu.errors` kind."""

from __future__ import annotations

from kata_ipu.errors import Aborted, DataLoss, FailedPrecondition, InvalidArgument, NotFound


class DigestMismatch(DataLoss):
    """Streamed bytes do not hash to the expected digest; the partial data was deleted."""

    def __init__(self, expected: str, actual: str, *, where: str = "") -> None:
        loc = f" ({where})" if where else ""
        super().__init__(f"digest mismatch{loc}: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(DataLoss):
    """More or fewer bytes than the descriptor declares; the partial data was deleted."""

    def __init__(self, digest: str, expected: int, actual: int, *, where: str = "") -> None:
        loc = f" ({where})" if where else ""
        more = "larger" if actual > expected else "smaller"
        super().__init__(
            f"blob {digest}{loc} is {more} than declared: expected {expected} bytes, "
            f"got {actual}{'+' if actual > expected else ''}"
        )
        self.digest = digest
        self.expected = expected
        self.actual = actual


class BlobNotFound(NotFound):
    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest} is not in the content store")
        self.digest = digest


class RefNotFound(NotFound):
    def __init__(self, ref: str) -> None:
        super().__init__(f"no image named {ref!r} in the content store")
        self.ref = ref


class IngestBusy(Aborted):
    """Another writer holds the ingest of this digest."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"ingest of {digest} is held by another writer")
        self.digest = digest


class InvalidLayout(InvalidArgument):
    """A directory or tarball to import is not a valid OCI layout / docker archive."""


class LeaseInUse(FailedPrecondition):
    pass
