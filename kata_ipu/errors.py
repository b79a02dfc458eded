"""The one exception root of kata-ipu and its mapping to gRPC/ttrpc status codes.

Exception tree (each class names a *kind* of failure, like containerd's errdefs)::

    KataIpuError                      code UNKNOWN
     ├── Cancelled                    CANCELLED
     ├── InvalidArgument              INVALID_ARGUMENT
     ├── DeadlineExceeded             DEADLINE_EXCEEDED
     ├── NotFound                     NOT_FOUND
     ├── AlreadyExists                ALREADY_EXISTS
     ├── PermissionDenied             PERMISSION_DENIED
     ├── ResourceExhausted            RESOURCE_EXHAUSTED
     ├── FailedPrecondition           FAILED_PRECONDITION
     ├── Aborted                      ABORTED
     ├── OutOfRange                   OUT_OF_RANGE
     ├── Unimplemented                UNIMPLEMENTED
     ├── Internal                     INTERNAL
     ├── Unavailable                  UNAVAILABLE
     ├── DataLoss                     DATA_LOSS
     └── Unauthenticated              UNAUTHENTICATED

Subpackages derive their semantic errors from one of these (``DigestMismatch(DataLoss)``,
``PoolFull(ResourceExhausted)``...), so that the ttrpc server maps every project exception to a
status code through one table (:func:`code_for`) and a client turns a status back into the
matching class (:func:`error_for_code`). Every error keeps its cause (``raise ... from exc``).
"""

from __future__ import annotations

import enum
import sys
from typing import ClassVar


class Code(enum.IntEnum):
    """gRPC status codes, as used on the ttrpc wire (google.rpc.Status.code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class KataIpuError(Exception):
    """Root of every error kata-ipu raises on purpose."""

    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        cause = self.__cause__
        if cause is not None and str(cause) and str(cause) not in self.message:
            return f"{self.message}: {cause}"
        return self.message


class Cancelled(KataIpuError):
    code = Code.CANCELLED


class InvalidArgument(KataIpuError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(KataIpuError):
    code = Code.DEADLINE_EXCEEDED


class NotFound(KataIpuError):
    code = Code.NOT_FOUND


class AlreadyExists(KataIpuError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(KataIpuError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(KataIpuError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(KataIpuError):
    code = Code.FAILED_PRECONDITION


class Aborted(KataIpuError):
    code = Code.ABORTED


class OutOfRange(KataIpuError):
    code = Code.OUT_OF_RANGE


class Unimplemented(KataIpuError):
    code = Code.UNIMPLEMENTED


class Internal(KataIpuError):
    code = Code.INTERNAL


class Unavailable(KataIpuError):
    code = Code.UNAVAILABLE


class DataLoss(KataIpuError):
    code = Code.DATA_LOSS


class Unauthenticated(KataIpuError):
    code = Code.UNAUTHENTICATED


# The one table from exception types to status codes. Order matters: the first matching entry
# wins, so subclasses come before their bases. Project errors carry their own ``code``; the
# entries below cover the standard-library errors a handler may let escape, following
# containerd/ttrpc's convertCode (IsNotExist -> NotFound, IsExist -> AlreadyExists, ...).
_STDLIB_CODES: tuple[tuple[type[BaseException], Code], ...] = (
    (TimeoutError, Code.DEADLINE_EXCEEDED),
    (FileNotFoundError, Code.NOT_FOUND),
    (FileExistsError, Code.ALREADY_EXISTS),
    (PermissionError, Code.PERMISSION_DENIED),
    (NotImplementedError, Code.UNIMPLEMENTED),
    (EOFError, Code.OUT_OF_RANGE),
    (BrokenPipeError, Code.FAILED_PRECONDITION),
)

_BY_CODE: dict[Code, type[KataIpuError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def code_for(exc: BaseException) -> Code:
    """Status code for an exception raised by a handler (the one mapping table)."""
    if isinstance(exc, KataIpuError):
        return exc.code
    # asyncio is not imported here (it costs ~25 ms at every shim start); if it is not
    # loaded, no asyncio.CancelledError can exist.
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and isinstance(exc, asyncio.CancelledError):
        return Code.CANCELLED
    for kind, code in _STDLIB_CODES:
        if isinstance(exc, kind):
            return code
    return Code.UNKNOWN


def error_for_code(code: int, message: str) -> KataIpuError:
    """Instantiate the project error class for a status code received from a peer."""
    try:
        cls = _BY_CODE[Code(code)]
    except (ValueError, KeyError):
        return KataIpuError(message)
    return cls(message)
