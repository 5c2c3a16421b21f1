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
    # Providers' own: Replicate's r8_ tokens, Google's AIza keys (issue 27); an AWS
    # SigV4 Authorization header's Credential= (the access key id) and Signature=.
    r"(?<![A-Za-z0-9])(?P<keep>sk-ig-|whsec_|sk-|r8_|AIza)[A-Za-z0-9_\-+/=]{6,}"
    r"|(?P<param>(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|signature"
    r"|credential)=)"
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


def _clean(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


def _factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Redact the record where it is made: its message and each string argument.
    Redacting only the formatted message is not enough: uvicorn's access formatter
    builds its line from ``record.args`` itself (a file URL's signature leaked so)."""
    record = _base_factory(*args, **kwargs)
    record.msg = _clean(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(_clean(a) for a in record.args)
    elif isinstance(record.args, dict):
        record.args = {k: _clean(v) for k, v in record.args.items()}
    return record


def install() -> None:
    """Redact every log record made from now on in this process (idempotent)."""
    if logging.getLogRecordFactory() is not _factory:
        logging.setLogRecordFactory(_factory)
