"""A process's resources, made once at its start and handed to what uses them.

The database engine, the storage, the Redis clients and the Celery app are made
together by ``start()``: the API's lifespan calls it and keeps the context on
``app.state`` (routes take its parts through api/deps.py's dependencies); a worker
consumer calls it before its pool's threads start (worker/main.py), and builds
what only a worker holds (thread pools, answer slots, HTTP clients) into it there;
a test starts its own from its own settings, so nothing is cleared between tests.
A script or a CLI command that never called ``start()`` gets one made from the
environment on first use.

A domain keeps what it makes from these (the limiter over Redis, the worker's
pools) on the context too, with ``made(name, factory)``: made once per context,
dropped with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy import Engine

from shared.core.broker import make_celery
from shared.core.db import make_process_engine
from shared.core.settings import Settings, get_settings
from shared.core.storage import Storage, make_storage

T = TypeVar("T")


@dataclass
class Context:
    settings: Settings
    engine: Engine
    storage: Storage
    celery: Celery
    redis: redis.Redis | None
    """Hints, replies, partial images, cache invalidation (None in embedded mode)."""
    async_redis: aioredis.Redis | None
    """The API's, on its one event loop: replies and the rate limit."""
    _made: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, settings: Settings) -> Context:
        url = settings.redis_url
        return cls(
            settings=settings,
            engine=make_process_engine(settings),
            storage=make_storage(settings),
            celery=make_celery(settings),
            redis=redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
            if url
            else None,
            async_redis=aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
            if url
            else None,
        )

    def made(self, name: str, factory: Callable[[Context], T]) -> T:
        """What ``factory`` makes from this context, made once (the first caller
        makes it; start-up code calls it before threads do)."""
        try:
            return self._made[name]  # type: ignore[no-any-return]  # as factory made it
        except KeyError:
            pass
        with self._lock:
            if name not in self._made:
                self._made[name] = factory(self)
            return self._made[name]  # type: ignore[no-any-return]  # as factory made it

    def close(self) -> None:
        self.engine.dispose()
        if self.redis is not None:
            self.redis.close()


_current: Context | None = None
_starting = threading.Lock()


def start(settings: Settings | None = None) -> Context:
    """Make the process's context from ``settings`` (the environment's by default),
    closing the one before, and use it from now on."""
    global _current
    with _starting:
        if _current is not None:
            _current.close()
        _current = Context.build(settings or get_settings())
        return _current


def current() -> Context:
    """The process's context (made from the environment if nothing started one)."""
    if _current is None:
        with _starting:
            if _current is None:
                _start_unlocked()
    assert _current is not None
    return _current


def _start_unlocked() -> None:
    global _current
    _current = Context.build(get_settings())


def stop() -> None:
    """Close the process's context; the next ``current()`` makes a new one."""
    global _current
    with _starting:
        if _current is not None:
            _current.close()
        _current = None
