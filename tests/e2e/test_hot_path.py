"""The hot path's shortcuts keep what they replace: a job published with one LPUSH is
the message Celery itself would send, and a pooled connection that died while idle
is replaced before use, though busy ones are not pinged each time.

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

from shared.core import broker, db
from shared.core.settings import get_settings
from tests.support.processes import PG_ADMIN_URL, RedisServer, create_database, drop_database


@pytest.fixture
def redis_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = RedisServer(tmp_path).start()
    monkeypatch.setenv("IMAGEGEN_BROKER_URL", server.url)
    for cached in (get_settings, broker.get_celery, broker._redis_broker):
        cached.cache_clear()
    try:
        yield server.url
    finally:
        for cached in (get_settings, broker.get_celery, broker._redis_broker):
            cached.cache_clear()
        server.stop()  # already gone after a shutdown: harmless


def _shape(value: Any) -> Any:
    """The keys of a message at every level (values differ: ids, tags, origin)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    return type(value).__name__ if value is not None else None


def test_published_job_is_celerys_own_message(redis_broker: str) -> None:
    client = redis.Redis.from_url(redis_broker)
    assert broker.publish_job("job_fast", "q-fast", reply=True)
    broker.get_celery().send_task(
        broker.Task.run_job, args=["job_fast"], kwargs={"reply": True}, queue="q-celery"
    )
    ours = json.loads(client.lindex("q-fast", 0) or b"{}")
    theirs = json.loads(client.lindex("q-celery", 0) or b"{}")

    assert ours["headers"]["task"] == theirs["headers"]["task"] == "imagegen.run_job"
    assert json.loads(base64.b64decode(ours["body"]))[:2] == [["job_fast"], {"reply": True}]
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(
        base64.b64decode(theirs["body"])
    )
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": "q-fast"}
    # Every field Celery's worker reads is there, of the same type (reply_to and
    # ignore_result aside: no result backend is used).
    for side in (ours, theirs):
        side["properties"].pop("reply_to")
        side["headers"].pop("ignore_result")
    assert _shape(ours) == _shape(theirs)


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
