"""Readiness: can this process do work now? The database, the broker and storage,
each probed with a short timeout; the answer names what failed and why (the
error's type and first line, never a URL's password)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import redis
from kombu import Connection  # type: ignore[attr-defined]
from sqlalchemy import text

from shared.core.db import get_engine
from shared.core.schemas import Schema
from shared.core.settings import get_settings
from shared.core.storage import get_storage


class Readiness(Schema):
    """``GET /readyz``."""

    status: Literal["ready", "not ready"]
    """``ready`` when every check is ``ok``."""
    checks: dict[str, str]
    """``database``, ``broker`` and ``storage``: ``ok`` or why not."""


def _database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _broker() -> None:
    settings = get_settings()
    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"the embedded broker's folder {folder} is not writable")
        return
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return
    # RabbitMQ (amqp://) and any other kombu transport: one try. kombu's
    # max_retries=1 slept its 2 s retry interval first, and /readyz took 2 s to say
    # that the broker was down.
    with Connection(url, connect_timeout=2) as connection:  # type: ignore[no-untyped-call]
        connection.ensure_connection(max_retries=0)


def _storage() -> None:
    get_storage().check()


PROBES: dict[str, Callable[[], None]] = {
    "database": _database,
    "broker": _broker,
    "storage": _storage,
}


def readiness() -> dict[str, str]:
    """Each dependency: "ok", or why not."""
    checks = {}
    for name, probe in PROBES.items():
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready": say which
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            checks[name] = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return checks
