"""JSON-lines logging, one object per line: ``time``, ``level``, ``msg`` plus context fields.

Context fields (``container_id``, ``image``, ``digest``...) come from ``extra=`` on the call or
from :func:`bind`, a context-variable scope that follows asyncio tasks. Nothing is configured at
import time; entry points call :func:`setup`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import sys
from collections.abc import Iterator
from typing import IO, Any

_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "kata_ipu_log_context", default=None
)

# Attributes every LogRecord has; anything else came from ``extra=``.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add fields to every log line emitted inside this scope (task-local)."""
    current = _CONTEXT.get() or {}
    token = _CONTEXT.set({**current, **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="microseconds"
            ),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        ctx = _CONTEXT.get()
        if ctx:
            out.update(ctx)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            out["error"] = str(record.exc_info[1])
            out["error_type"] = type(record.exc_info[1]).__name__
        return json.dumps(out, default=str, separators=(",", ":"))


def setup(level: int | str = logging.INFO, stream: IO[str] | None = None) -> None:
    """Route the ``kata_ipu``/``shim_hooks`` loggers to JSON lines on ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("kata_ipu", "shim_hooks", "guest_hooks"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
