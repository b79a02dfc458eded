"""Progress objects: one :class:`BlobStatus` per blob being fetched.

A ``BlobStatus`` is written by exactly one ingest thread and read by anyone (the API's ``Status``
call, a CLI progress bar); readers call :meth:`BlobStatus.snapshot` to get an immutable
:class:`BlobProgress`. Fields are plain ints/strings whose assignment is atomic under CPython.

States: ``waiting`` (queued, or waiting for another pull of the same digest) → ``downloading``
→ ``verifying`` → ``done`` | ``exists`` (was already in the store) | ``failed``.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass


class BlobState(enum.StrEnum):
    WAITING = "waiting"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    DONE = "done"
    EXISTS = "exists"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class BlobProgress:
    """Immutable view of a blob's progress."""

    digest: str
    media_type: str
    total: int
    offset: int
    fetched: int
    state: BlobState
    error: str
    started_at: float
    updated_at: float

    @property
    def done(self) -> bool:
        return self.state in (BlobState.DONE, BlobState.EXISTS)


class BlobStatus:
    """Mutable progress of one blob; ``offset`` counts bytes in the ingest (resumed included),
    ``fetched`` only the bytes that crossed the network in this attempt sequence."""

    __slots__ = ("digest", "error", "fetched", "media_type", "offset", "restarts",
                 "started_at", "state", "total", "updated_at", "verified")

    def __init__(self, digest: str, total: int, media_type: str = "") -> None:
        self.digest = digest
        self.total = total
        self.media_type = media_type
        self.offset = 0
        self.fetched = 0
        self.state = BlobState.WAITING
        self.error = ""
        # For readers that follow the ingest (content/follow.py): bumped *before* the bytes
        # written so far are dropped, and set once size and digest matched (before fsync).
        self.restarts = 0
        self.verified = False
        self.started_at = time.time()
        self.updated_at = self.started_at

    def set_state(self, state: BlobState, error: str = "") -> None:
        self.state = state
        if error:
            self.error = error
        self.updated_at = time.time()

    def advance(self, n: int) -> None:
        self.offset += n
        self.fetched += n
        self.updated_at = time.time()

    def snapshot(self) -> BlobProgress:
        return BlobProgress(self.digest, self.media_type, self.total, self.offset, self.fetched,
                            self.state, self.error, self.started_at, self.updated_at)
