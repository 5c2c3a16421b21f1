"""Event-driven waiting for a job to finish.

One Redis pub/sub subscription per API process feeds in-process events, so a
sync request sleeps until the worker says its job changed; no loop polls the
database on the Redis path. A message names the status the job reached, so a
waiter re-reads nothing until it is finished (and then takes the worker's reply,
shared/jobs/replies.py); without a status (a reconnect) or on a slow fallback
timer, 10 s, in case a message was lost while Redis restarted, it re-reads the row. In
embedded mode there is no Redis: the fallback timer is then short (SQLite
reads are cheap and local).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from shared.core.events import CHANNEL

log = logging.getLogger(__name__)


class Change(asyncio.Event):
    """Set whenever the job may have changed. ``status`` is the status its last
    message announced; None when unknown (a reconnect): re-read the row."""

    def __init__(self) -> None:
        super().__init__()
        self.status: str | None = None

    def take(self) -> str | None:
        """The announced status (None if the timer fired or none was announced), and clear."""
        status = self.status if self.is_set() else None
        self.status = None
        self.clear()
        return status


class JobWaiter:
    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url
        self.connected = False
        self._events: dict[str, set[Change]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.redis_url:
            self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _wake(self, job_id: str | None = None, status: str | None = None) -> None:
        targets = self._events.values() if job_id is None else [self._events.get(job_id, set())]
        for events in targets:
            for event in events:
                event.status = status
                event.set()

    async def _listen(self) -> None:
        assert self.redis_url
        while True:
            client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.connected = True
                    self._wake()  # messages may have been missed while disconnected
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        try:
                            data = json.loads(message["data"])
                            job_id, status = data["id"], data.get("status")
                        except (ValueError, KeyError, TypeError):
                            continue
                        self._wake(job_id, status if isinstance(status, str) else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("job events subscription lost: %s", exc)
                self.connected = False
                self._wake()
                await asyncio.sleep(1.0)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _fallback(self) -> float:
        if self.redis_url is None:
            return 0.1
        return 10.0 if self.connected else 1.0

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[Change]:
        """An event set whenever the job may have changed (clear it before re-reading)."""
        event = Change()
        self._events.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[job_id]

    async def changed(self, event: asyncio.Event, seconds: float) -> None:
        """Sleep until ``event`` is set, the fallback timer fires, or ``seconds`` pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), min(seconds, self._fallback()))
