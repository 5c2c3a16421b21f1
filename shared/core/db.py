"""The engine, and the unit of work: the one place a transaction commits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from shared.core import outbox
from shared.core.settings import get_settings


def make_engine(url: str) -> Engine:
    # hide_parameters: a failed statement's error (and so any log of it) never
    # carries the bound values, which can be secrets (a new whsec_ secret, a hash).
    if url.startswith("sqlite"):
        # Many threads (API threadpool, worker threads) share one SQLite file:
        # WAL lets readers run beside the one writer, busy_timeout queues writers.
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=20,
            hide_parameters=True,
        )

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(
        url, pool_size=20, max_overflow=40, pool_pre_ping=True, hide_parameters=True
    )


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """The one transaction boundary: commit on success, then send what the work
    collected for after the commit (``shared.core.outbox``); on error roll back and
    drop it. Services take the session and only flush; a request (``api.deps``),
    a worker step and a CLI command each open one of these."""
    with Session(get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            outbox.discard(session)
            raise
        outbox.flush_sends(session)
