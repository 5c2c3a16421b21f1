"""The engine, and the unit of work: the one place a transaction commits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from shared.core import outbox
from shared.core.private_files import private_dir, tighten_sqlite
from shared.core.settings import Settings


def make_engine(url: str, pool_size: int = 20, max_overflow: int = 40) -> Engine:
    # hide_parameters: a failed statement's error (and so any log of it) never
    # carries the bound values, which can be secrets (a new whsec_ secret, a hash).
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            # Only this user reads the data (the file is made 0600 before SQLite
            # opens it; its -wal and -shm then get the same mode).
            tighten_sqlite(Path(database))
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
    engine = sa.create_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, hide_parameters=True
    )
    _ping_when_idle(engine)
    return engine


# A connection back from the pool is checked with a ping only after it sat idle this
# long. SQLAlchemy's pool_pre_ping pings on every checkout: a round trip per
# transaction (two per job on a worker, one more per request), for connections a
# busy process used milliseconds ago. One idle across a database restart is still
# replaced before use; one in use when the database goes away fails its statement,
# as it would with pre-ping, and the pool is then invalidated.
IDLE_PING_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling for connections that sat idle (SQLAlchemy's
    documented custom recipe: raising DisconnectionError on checkout makes the pool
    discard the connection and try a fresh one)."""

    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("checked_in")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return  # new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise sa.exc.DisconnectionError(str(exc)) from exc


def make_process_engine(settings: Settings) -> Engine:
    """The engine a process uses (made by shared/core/context.py at its start)."""
    if settings.resolved_database_url.startswith("sqlite"):
        private_dir(settings.data_dir)
    return make_engine(
        settings.resolved_database_url, settings.database_pool_size, settings.database_max_overflow
    )


def get_engine() -> Engine:
    """The process's engine (its context's)."""
    from shared.core.context import current  # the context is made of this module's parts

    return current().engine


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
