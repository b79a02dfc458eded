"""Faults the daemon makes on purpose or has to recognise.

* :func:`crash_point` — fault injection for the crash tests: ``KATA_IPU_CRASH_AT=<stage>``
  makes the daemon SIGKILL itself at that point (``build``, ``clone``, ``export``), leaving
  exactly the half-done state a power cut would (docs/adr/0003, 0007).
* :func:`out_of_space` — whether a failure was, somewhere in its cause chain, a full disk
  (``ENOSPC``, or a tool that said so on stderr), so that it can be raised as
  :class:`~kata_ipu.errors.ResourceExhausted`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal

from kata_ipu.errors import ResourceExhausted
from kata_ipu.executor import CommandFailed

log = logging.getLogger("kata_ipu.daemon")

CRASH_ENV = "KATA_IPU_CRASH_AT"


def crash_point(stage: str) -> None:
    """SIGKILL this process if ``KATA_IPU_CRASH_AT`` names ``stage``. Costs one environment
    lookup otherwise."""
    if os.environ.get(CRASH_ENV) == stage:
        log.warning("crash point %s: killing myself", stage)
        os.kill(os.getpid(), signal.SIGKILL)


def out_of_space(exc: BaseException) -> bool:
    """ENOSPC anywhere in the cause chain, or a tool that said so on stderr."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if isinstance(seen, ResourceExhausted):
            return False  # already typed: keep it
        if isinstance(seen, CommandFailed) and b"No space left on device" in (
                seen.result.stderr + seen.result.stdout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
