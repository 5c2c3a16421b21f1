"""Change notifications over Redis pub/sub: a job's status, a batch's progress.

Only a hint that wakes waiters: the SQL row stays the truth, so a lost message
delays a waiter (it re-reads the row on its fallback timer), it never misleads one.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

import redis
import redis.asyncio as aioredis

from shared.core.settings import get_settings

CHANNEL = "imagegen:jobs"
log = logging.getLogger(__name__)


@lru_cache
def redis_client() -> redis.Redis | None:
    """The process's Redis client for hints (None in embedded mode)."""
    url = get_settings().redis_url
    if not url:
        return None
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


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


@lru_cache
def async_redis_client() -> aioredis.Redis | None:
    """The API's asyncio Redis client (made in, and bound to, its one event loop)."""
    url = get_settings().redis_url
    if not url:
        return None
    return aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
