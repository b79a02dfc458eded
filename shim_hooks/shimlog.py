"""Where the shim logs: the FIFO ``log`` in the bundle, JSON lines.

containerd creates ``<bundle>/log`` before it runs the shim, keeps it open and copies every line
into its own stderr (``openShimLog``), so an error written here shows up in containerd's log
next to the failed call. Nothing of the shim may go to stdout/stderr during ``start`` (containerd
reads them as the address), so when the FIFO has no reader the shim logs nowhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import IO

from kata_ipu import log as jsonlog


def open_fifo(bundle: str | Path) -> IO[str] | None:
    """The bundle's log FIFO for writing (blocking writes), or None without a reader."""
    path = Path(bundle) / "log"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    os.set_blocking(fd, True)
    return open(fd, "w", buffering=1, encoding="utf-8", closefd=True)


def setup(bundle: str | Path, debug: bool = False) -> IO[str] | None:
    """Route the JSON-lines logger to the bundle's FIFO; returns the stream (or None)."""
    stream = open_fifo(bundle)
    level = logging.DEBUG if debug else logging.INFO
    if stream is None:
        null = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives with the process
        jsonlog.setup(logging.CRITICAL + 1, null)
        return None
    jsonlog.setup(level, stream)
    return stream


def close(stream: IO[str] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()
