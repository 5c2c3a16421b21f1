"""Change notifications over Redis pub/sub: a job's status, a batch's progress.

Only a hint that wakes waiters: the SQL row stays the truth, so a lost message
delays a waiter (it re-reads the row on its fallback timer), it never misleads one.
"""

from __future__ import annotations

import json
import logging

import redis
import redis.asyncio as aioredis

CHANNEL = "imagegen:jobs"
log = logging.getLogger(__name__)


def redis_client() -> redis.Redis | None:
    """The process's Redis client for hints (None in embedded mode): its context's."""
    from shared.core.context import current  # the context is made of this module's parts

    return current().redis


def changed_message(object_id: str, status: str) -> str:
    return json.dumps({"id": object_id, "status": status})


def publish_changed(object_id: str, status: str) -> None:
    """Wake whoever waits on ``object_id`` (a job or a batch: sync waits, SSE streams)."""
    client = redis_client()
    if client is None:
        return
    try:
        client.publish(CHANNEL, changed_message(object_id, status))
    except redis.RedisError as exc:
        log.warning("could not publish change of %s: %s", object_id, exc)


def async_redis_client() -> aioredis.Redis | None:
    """The API's asyncio Redis client (used on its one event loop): its context's."""
    from shared.core.context import current  # the context is made of this module's parts

    return current().async_redis
