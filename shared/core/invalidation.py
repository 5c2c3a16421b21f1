"""In-process caches of rows read on every request but rarely changed (a key's
principal, a project's webhook endpoints), dropped at once through Redis pub/sub.

A write that changes such a row calls ``invalidate(cache, key)`` after its commit;
every process's listener thread then drops that entry. Two rules keep a cache
from ever serving a change late (a revoked key must stop working at once):

- A process caches only while its subscription is up. Without Redis (embedded
  mode), or while the subscription is down, every lookup reads the database; on
  (re)subscribing every cache is emptied, since messages may have been missed.
- Each cache counts invalidations (a generation). A value read from the database
  is stored only if no invalidation arrived since the read began, so a read racing
  a change never stores the old value after the change was announced.

A backstop bounds what a missed message could cost: an entry lives at most
``MAX_AGE_SECONDS`` (a writer with no Redis configured, an operator's shell
without ``IMAGEGEN_REDIS_URL``, cannot announce its change).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import redis

from shared.core.events import redis_client
from shared.core.settings import get_settings

CHANNEL = "imagegen:invalidate"
log = logging.getLogger(__name__)
V = TypeVar("V")

# Bounds memory however many distinct keys a process sees; past it a cache starts over.
MAX_ENTRIES = 10_000
MAX_AGE_SECONDS = 60.0
_WAIT_SECONDS = 30.0


class _Listener:
    """One subscription per process, on a daemon thread, started on first use."""

    def __init__(self) -> None:
        self.connected = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure_started(self) -> bool:
        """Whether caching is allowed now (starting the listener if it is not yet)."""
        if self._thread is None:
            url = get_settings().redis_url
            if not url:
                return False
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, args=(url,), name="cache-invalidation", daemon=True
                    )
                    self._thread.start()
        return self.connected

    def _run(self, url: str) -> None:
        while True:
            client = redis.Redis.from_url(
                url, socket_connect_timeout=2, socket_keepalive=True, health_check_interval=10
            )
            try:
                pubsub = client.pubsub()
                pubsub.subscribe(CHANNEL)
                while True:
                    # get_message rather than listen(), which redis-py leaves untyped;
                    # the timeout only wakes the loop (each wait also health-checks).
                    message = pubsub.get_message(timeout=_WAIT_SECONDS)
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind == "subscribe":
                        _drop_everything()  # changes may have been missed before
                        self.connected = True
                    elif kind == "message":
                        _apply(message.get("data"))
            except Exception as exc:
                if self.connected:
                    log.warning("cache invalidation subscription lost: %s", exc)
            finally:
                self.connected = False
                _drop_everything()
                client.close()
            time.sleep(1.0)


_LISTENER = _Listener()
_CACHES: dict[str, InvalidatedCache[object]] = {}


def _drop_everything() -> None:
    for cache in list(_CACHES.values()):
        cache.drop(None)


def _apply(data: object) -> None:
    try:
        message = json.loads(data)  # type: ignore[arg-type]
        cache = _CACHES.get(message["cache"])
        key = message.get("key")
    except (ValueError, KeyError, TypeError):
        return
    if cache is not None:
        cache.drop(key if isinstance(key, str) else None)


class InvalidatedCache(Generic[V]):
    def __init__(self, name: str) -> None:
        self.name = name
        self._data: dict[str, tuple[V, float]] = {}  # value, stored at (monotonic)
        self._generation = 0
        self._lock = threading.Lock()
        _CACHES[name] = self  # type: ignore[assignment]

    def cached(self, key: str) -> tuple[V | None, int | None]:
        """(value, None) on a hit; (None, generation) on a miss, the generation to hand
        to ``store`` once the value is read; (None, None) when caching is off now."""
        if not _LISTENER.ensure_started():
            return None, None
        with self._lock:
            entry = self._data.get(key)
            if entry is not None and time.monotonic() - entry[1] < MAX_AGE_SECONDS:
                return entry[0], None
            return None, self._generation

    def store(self, key: str, value: V, generation: int | None) -> None:
        if generation is None:
            return
        with self._lock:
            if generation != self._generation or not _LISTENER.connected:
                return  # changed meanwhile: the next lookup reads it again
            if len(self._data) >= MAX_ENTRIES:
                self._data.clear()
            self._data[key] = (value, time.monotonic())

    def get(self, key: str, load: Callable[[], V]) -> V:
        """The cached value, or ``load()`` (stored when that is safe)."""
        value, generation = self.cached(key)
        if value is not None:
            return value
        value = load()
        self.store(key, value, generation)
        return value

    def drop(self, key: str | None) -> None:
        """Forget ``key`` (every key when None)."""
        with self._lock:
            self._generation += 1
            if key is None:
                self._data.clear()
            else:
                self._data.pop(key, None)


def invalidate(cache: str, key: str | None = None) -> None:
    """Tell every process to drop ``key`` (all keys when None) from ``cache``; call it
    after the change committed (``after_commit``)."""
    client = redis_client()
    if client is None:
        return  # no process caches without Redis
    try:
        client.publish(CHANNEL, json.dumps({"cache": cache, "key": key}))
    except redis.RedisError as exc:
        # Each listener's subscription shares this Redis: if it is down they are
        # disconnected too, and not caching.
        log.warning("could not publish invalidation of %s %s: %s", cache, key, exc)
