"""Waiting for what a daemon does after it has answered (releases in the background,
containerd's garbage collection), without sleeping longer than needed."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(check: Callable[[], bool], timeout: float = 20.0, interval: float = 0.1) -> bool:
    """True as soon as ``check()`` is, False if it still is not after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
