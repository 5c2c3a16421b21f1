"""A deployment of many processes sizes each one's PostgreSQL pool (capacity.md)."""

from __future__ import annotations

import sqlalchemy as sa

from shared.core.db import make_process_engine
from shared.core.settings import Settings


def test_pool_settings_size_a_processs_postgresql_pool() -> None:
    settings = Settings(
        database_url="postgresql+psycopg://u@127.0.0.1:1/db",
        database_pool_size=3,
        database_max_overflow=2,
    )
    engine = make_process_engine(settings)  # nothing connects until first use
    try:
        assert isinstance(engine.pool, sa.pool.QueuePool)
        assert engine.pool.size() == 3
        assert engine.pool._max_overflow == 2  # no public reader
    finally:
        engine.dispose()


def test_defaults_are_unchanged() -> None:
    settings = Settings(database_url="postgresql+psycopg://u@127.0.0.1:1/db")
    engine = make_process_engine(settings)
    try:
        assert engine.pool.size() == 20  # type: ignore[attr-defined]
    finally:
        engine.dispose()
