"""``GET /v1/images/jobs/{id}/events``: server-sent events of a job's changes.

It opens with the current state (a late subscriber misses nothing that matters:
every event carries the whole job object), sends one event per status change
until the job ends, then closes. Changes arrive through the same Redis pub/sub
as sync waits, so any API process can serve any job's stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.deps import BaseUrl, CurrentPrincipal, SettingsDep, StorageDep
from api.routes.images import ERRORS
from shared.db import session_scope
from shared.jobs import get_job, job_images, queue_position, render_job
from shared.models import FINISHED
from shared.schemas import JobObject

router = APIRouter(tags=["jobs"])
KEEPALIVE_SECONDS = 15.0


@router.get("/v1/images/jobs/{job_id}/events",
            responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def job_events(job_id: str, request: Request, principal: CurrentPrincipal,
                     settings: SettingsDep, storage: StorageDep,
                     base_url: BaseUrl) -> StreamingResponse:
    def snapshot() -> JobObject:
        with session_scope() as session:
            job = get_job(session, principal.project_id, job_id)
            images = job_images(session, job) if job.status in FINISHED else []
            position = queue_position(session, job)
        obj = render_job(job, images, storage, base_url, settings.url_expiry_seconds)
        obj.queue_position = position
        return obj

    first = await run_in_threadpool(snapshot)  # a 404 here, before the stream starts
    waiter = request.app.state.waiter

    async def stream() -> AsyncIterator[bytes]:
        async with waiter.subscribe(job_id) as event:
            current, number, last = first, 0, None
            while True:
                state = (current.status, current.queue_position)
                if state != last:
                    number += 1
                    last = state
                    data = json.dumps(current.model_dump(mode="json", exclude_none=True))
                    yield f"id: {number}\nevent: job.{current.status}\ndata: {data}\n\n".encode()
                if current.status in FINISHED:
                    return
                event.clear()
                before = asyncio.get_running_loop().time()
                await waiter.changed(event, KEEPALIVE_SECONDS)
                if not event.is_set() and (asyncio.get_running_loop().time() - before
                                           >= KEEPALIVE_SECONDS - 0.01):
                    yield b": keep-alive\n\n"
                current = await run_in_threadpool(snapshot)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
