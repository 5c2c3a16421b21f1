"""The hot path keeps what it needs: a published job waits on its queue, a refused
publish is reported, and a pooled connection that died while idle is replaced
before use, though busy ones are not pinged each time.

Real Redis and PostgreSQL, no stack: the worker consuming these messages is
exercised by every other e2e module."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy as sa

from shared.core import broker, context, db
from shared.core.settings import get_settings
from tests.support.processes import PG_ADMIN_URL, RedisServer, create_database, drop_database


@pytest.fixture
def redis_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = RedisServer(tmp_path).start()
    monkeypatch.setenv("IMAGEGEN_BROKER_URL", server.url)
    get_settings.cache_clear()
    context.start()  # this test's broker
    try:
        yield server.url
    finally:
        context.stop()
        get_settings.cache_clear()
        server.stop()  # already gone after a shutdown: harmless


def test_a_published_job_waits_on_its_own_queue(redis_broker: str) -> None:
    """Published through Celery: its task message, naming the job, on the model's
    queue (a Redis list of that name), as the worker consuming it reads it."""
    client = redis.Redis.from_url(redis_broker)
    assert broker.publish_job("job_fast", "q-fast", reply=True)
    assert broker.publish_jobs(["job_a", "job_b"], "q-batch")
    fast = json.loads(client.lindex("q-fast", 0) or b"{}")
    assert fast["headers"]["task"] == "imagegen.run_job"
    assert json.loads(base64.b64decode(fast["body"]))[:2] == [["job_fast"], {"reply": True}]
    assert fast["properties"]["delivery_info"]["routing_key"] == "q-fast"
    lines = json.loads(client.lindex("q-batch", 0) or b"{}")
    assert lines["headers"]["task"] == "imagegen.run_jobs"
    assert json.loads(base64.b64decode(lines["body"]))[0] == [["job_a", "job_b"]]


def test_a_refused_publish_is_reported(redis_broker: str) -> None:
    # The broker gone: the job is left for the sweeper (False), never an exception.
    redis.Redis.from_url(redis_broker).shutdown(nosave=True)
    assert broker.publish_job("job_lost", "q-fast") is False


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


def _counting_pings(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pings: list[int] = []
    real = engine.dialect.do_ping

    def counted(dbapi_conn: Any) -> bool:
        pings.append(1)
        return real(dbapi_conn)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return pings


def test_busy_connections_are_not_pinged(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = db.make_engine(pg_url)
    pings = _counting_pings(engine, monkeypatch)
    try:
        for _ in range(5):
            with engine.connect() as conn:
                assert conn.execute(sa.text("select 1")).scalar() == 1
        assert pings == []
        monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.05)
        time.sleep(0.1)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        assert len(pings) == 1
    finally:
        engine.dispose()


def test_a_connection_that_died_idle_is_replaced(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.05)
    engine = db.make_engine(pg_url)
    try:
        with engine.connect() as conn:
            first = conn.execute(sa.text("select pg_backend_pid()")).scalar()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (first,))
        time.sleep(0.1)
        with engine.connect() as conn:  # no error: the dead one was found and replaced
            second = conn.execute(sa.text("select pg_backend_pid()")).scalar()
        assert second != first
    finally:
        engine.dispose()
