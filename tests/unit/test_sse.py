"""Streams on one thing share one watch (api/sse.py): one snapshot per change or
fallback tick whatever the number of streams, every stream still sees each change,
and one key holds at most MAX_STREAMS_PER_KEY of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Any

import pytest

from api import sse
from api.sse import Frame, event_stream
from api.waiter import JobWaiter
from shared.core.errors import RateLimited


def frame(state: str) -> Frame:
    return Frame(name=f"job.{state}", data={"status": state}, state=state, final=state == "done")


async def collect(body: AsyncIterable[Any], into: list[str]) -> None:
    async for chunk in body:
        text = chunk.decode() if isinstance(chunk, bytes) else str(chunk)
        into.extend(line for line in text.splitlines() if line.startswith("event:"))


@pytest.mark.anyio
async def test_many_streams_on_one_job_read_it_once_per_tick_and_all_see_each_change() -> None:
    waiter = JobWaiter(None)  # embedded mode: no Redis, a 0.1 s fallback tick
    reads = 0
    state = "queued"

    def snapshot() -> Frame:
        nonlocal reads
        reads += 1
        return frame(state)

    streams = 200
    seen: list[list[str]] = [[] for _ in range(streams)]
    tasks = [
        asyncio.create_task(
            collect(event_stream(waiter, "job_1", frame("queued"), snapshot).body_iterator, s)
        )
        for s in seen
    ]
    await asyncio.sleep(1.0)
    # One reader for all 200 streams: about ten reads a second, where each stream
    # read for itself before (2,000).
    assert 3 <= reads <= 20, reads
    state = "running"
    await asyncio.sleep(0.5)
    state = "done"
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(s == ["event: job.queued", "event: job.running", "event: job.done"] for s in seen)
    assert sse._WATCHES == {}


@pytest.mark.anyio
async def test_a_key_holds_a_bounded_number_of_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_STREAMS_PER_KEY", 3)
    waiter = JobWaiter(None)
    bodies = [
        event_stream(waiter, f"job_{i}", frame("queued"), lambda: frame("queued"), owner="key_a")
        for i in range(3)
    ]
    tasks = [asyncio.create_task(collect(b.body_iterator, [])) for b in bodies]
    await asyncio.sleep(0.2)
    with pytest.raises(RateLimited):
        event_stream(waiter, "job_9", frame("queued"), lambda: frame("queued"), owner="key_a")
    event_stream(waiter, "job_9", frame("queued"), lambda: frame("queued"), owner="key_b")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)
    assert sse._OPEN["key_a"] == 0
