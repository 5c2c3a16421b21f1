"""Logging for every imagegen process: readable text (the default), or one JSON
object a line (``IMAGEGEN_LOG_FORMAT=json``) for a log pipeline. Either way each
line carries the context it was written in: ``request_id`` (the API request),
``job_id``, ``batch_id`` and ``project`` (set where a request or job is handled,
``bind``), so one job's lines can be found across the API and the workers."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter

from shared.core.settings import Settings

FIELDS = ("request_id", "job_id", "batch_id", "project")
_context: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(name, default=None) for name in FIELDS
}
TEXT = "%(asctime)s %(levelname)s [%(name)s] %(message)s%(context)s"


class ContextFilter(logging.Filter):
    """Puts the bound context on every record (``context``: the text form)."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = {name: var.get() for name, var in _context.items()}
        for name, value in bound.items():
            setattr(record, name, value)
        record.context = "".join(f" {k}={v}" for k, v in bound.items() if v)
        return True


def configure(settings: Settings) -> None:
    """The process's root handler, in the configured format (called once, first)."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                reserved_attrs=[*JsonFormatter().reserved_attrs, "context", "color_message"],
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


@contextmanager
def bind(**values: str | None) -> Iterator[None]:
    """Within the block, every line logged (in this thread or task) carries these."""
    tokens = [(_context[name], _context[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current(name: str) -> str | None:
    return _context[name].get()
