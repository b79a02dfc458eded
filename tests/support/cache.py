"""The test cache: things slow to make (debootstrap trees, guest kernels and images, the Go
peer) kept outside the repository between runs, under ``$KATA_IPU_TEST_CACHE`` (default
``/var/cache/kata-ipu-tests``). Never required: a miss rebuilds. Builders serialize on a
lock file so concurrent test processes build each item once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "KATA_IPU_TEST_CACHE"
DEFAULT_CACHE = "/var/cache/kata-ipu-tests"


def cache_dir(sub: str = "") -> Path:
    """The cache directory (or its subdirectory ``sub``), created if missing."""
    path = Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))
    if sub:
        path = path / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
