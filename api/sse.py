"""Server-sent events of something that changes (a job, a batch), woken by the
waiter's Redis pub/sub: one event per observed change, keep-alive comments while
idle, closed after the final state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.waiter import JobWaiter

KEEPALIVE_SECONDS = 15.0


@dataclass(frozen=True)
class Frame:
    """One observation: the event to send if ``state`` differs from the last one."""

    name: str
    data: dict[str, Any]
    state: Hashable
    final: bool


def event_stream(
    waiter: JobWaiter, key: str, first: Frame, snapshot: Callable[[], Frame], coalesce: float = 0.0
) -> StreamingResponse:
    """``first`` is taken before the response starts (so a 404 is still a 404);
    ``coalesce`` waits that long after a wake-up to fold bursts into one event."""

    async def stream() -> AsyncIterator[bytes]:
        async with waiter.subscribe(key) as event:
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
                event.clear()
                await waiter.changed(event, KEEPALIVE_SECONDS)
                if not event.is_set():
                    yield b": keep-alive\n\n"
                elif coalesce:
                    await asyncio.sleep(coalesce)
                current = await run_in_threadpool(snapshot)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
