"""Secrets never reach a log line: every record's message is redacted as it is
formatted (API keys, webhook signing secrets, presigned-URL and file signatures),
whoever logged it (our code, uvicorn's access log, Celery, SQLAlchemy).

Defense in depth: the engine is also made with ``hide_parameters`` so a failed
statement's bound values (a fresh ``whsec_`` secret, a key hash) are never part of
the error text in the first place.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_SECRETS = re.compile(
    # API keys and secrets, then signatures in URLs.
    r"(?<![A-Za-z0-9])(?P<keep>sk-ig-|whsec_|sk-)[A-Za-z0-9_\-+/=]{6,}"
    r"|(?P<param>(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|signature)=)"
    r"[^&\s\"']+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    def repl(match: re.Match[str]) -> str:
        if match.group("keep"):
            return f"{match.group('keep')}***"
        return f"{match.group('param')}***"

    return _SECRETS.sub(repl, text)


_base_factory = logging.getLogRecordFactory()


class _RedactingRecord(logging.LogRecord):
    def getMessage(self) -> str:  # noqa: N802 (logging's own name)
        return redact(super().getMessage())


def _factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.__class__ = _RedactingRecord
    return record


def install() -> None:
    """Redact every log record made from now on in this process (idempotent)."""
    if logging.getLogRecordFactory() is not _factory:
        logging.setLogRecordFactory(_factory)
