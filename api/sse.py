"""Server-sent events of something that changes (a job, a batch), woken by the
waiter's Redis pub/sub: one event per observed change, keep-alive comments while
idle, closed after the final state.

Every stream on one thing shares one watch: a single task reads a snapshot per
change (or per fallback tick, in embedded mode every 0.1 s) and hands it to all of
them. 300 streams on one job each re-read the row ten times a second before, and
the API spent a core on it (its /healthz p50 went 1 -> 365 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.waiter import JobWaiter
from shared.core.errors import RateLimited

KEEPALIVE_SECONDS = 15.0
# Streams one API key may hold open in this process at once; one more is 429.
MAX_STREAMS_PER_KEY = 100
_OPEN: Counter[str] = Counter()


@dataclass(frozen=True)
class Frame:
    """One observation: the event to send if ``state`` differs from the last one."""

    name: str
    data: dict[str, Any]
    state: Hashable
    final: bool


@dataclass
class _Watch:
    """The latest frame of one thing, read once for all the streams on it."""

    frame: Frame
    version: int = 0
    streams: int = 0
    error: BaseException | None = None
    fresh: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def publish(self, frame: Frame | None = None, error: BaseException | None = None) -> None:
        if frame is not None:
            self.frame = frame
        self.error = error
        self.version += 1
        fresh, self.fresh = self.fresh, asyncio.Event()
        fresh.set()  # wakes every stream waiting on this version


_WATCHES: dict[Hashable, _Watch] = {}


def opened(owner: str | None, change: int) -> None:
    if owner is None:
        return
    _OPEN[owner] += change
    if _OPEN[owner] <= 0:
        del _OPEN[owner]


async def _observe(
    waiter: JobWaiter,
    key: Hashable,
    topic: str,
    watch: _Watch,
    snapshot: Callable[[], Frame],
    coalesce: float,
) -> None:
    async with waiter.subscribe(topic) as event:
        while watch.streams and not watch.frame.final:
            event.clear()
            await waiter.changed(event, KEEPALIVE_SECONDS)
            if event.is_set() and coalesce:
                await asyncio.sleep(coalesce)
            try:
                frame = await run_in_threadpool(snapshot)
            except Exception as exc:  # the streams end with it, as each did alone
                watch.publish(error=exc)
                break
            if frame.state != watch.frame.state or frame.final:
                watch.publish(frame)
    if _WATCHES.get(key) is watch:
        del _WATCHES[key]


def _join(
    key: Hashable, first: Frame, observe: Callable[[_Watch], Coroutine[Any, Any, None]]
) -> _Watch:
    """The watch on ``key``, started with ``observe`` if there is none running."""
    watch = _WATCHES.get(key)
    if watch is None or watch.task is None or watch.task.done():
        watch = _WATCHES[key] = _Watch(first)
    watch.streams += 1
    if watch.task is None:
        watch.task = asyncio.create_task(observe(watch))
    return watch


def _leave(key: Hashable, watch: _Watch) -> None:
    watch.streams -= 1
    if not watch.streams and watch.task is not None:
        watch.task.cancel()
        if _WATCHES.get(key) is watch:
            del _WATCHES[key]


def event_stream(
    waiter: JobWaiter,
    topic: str,
    first: Frame,
    snapshot: Callable[[], Frame],
    coalesce: float = 0.0,
    scope: Hashable = None,
    owner: str | None = None,
) -> StreamingResponse:
    """``first`` is taken before the response starts (so a 404 is still a 404);
    ``coalesce`` waits that long after a wake-up to fold bursts into one event.
    Streams share a watch when their ``topic`` and ``scope`` (what else shapes a
    snapshot, such as the base URL of its links) are equal. ``owner`` (the API key)
    holds at most MAX_STREAMS_PER_KEY streams open."""
    key = (topic, scope)
    if owner is not None and _OPEN[owner] >= MAX_STREAMS_PER_KEY:
        raise RateLimited(
            f"This API key has {MAX_STREAMS_PER_KEY} event streams open; close one first.",
            retry_after=5,
        )

    async def stream() -> AsyncIterator[bytes]:
        opened(owner, +1)
        watch = _join(key, first, lambda w: _observe(waiter, key, topic, w, snapshot, coalesce))
        # Only what the watch reads after this stream's own first snapshot is news to
        # it: an older frame of the watch's would send a state back in time.
        seen = watch.version
        try:
            current, number, last = first, 0, None
            while True:
                if current.state != last:
                    number += 1
                    last = current.state
                    yield (
                        f"id: {number}\nevent: {current.name}\ndata: {json.dumps(current.data)}\n\n"
                    ).encode()
                if current.final:
                    return
                if watch.version == seen:
                    fresh = watch.fresh
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(fresh.wait(), KEEPALIVE_SECONDS)
                    if watch.version == seen:
                        yield b": keep-alive\n\n"
                        continue
                seen = watch.version
                if watch.error is not None:
                    raise watch.error
                current = watch.frame
        finally:
            opened(owner, -1)
            _leave(key, watch)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
