"""``GET /v1/images/jobs/{id}/events``: server-sent events of a job's changes.

It opens with the current state (a late subscriber misses nothing that matters:
every event carries the whole job object), sends one event per status change
(and `job.progress` per recorded denoising step of a local model) until the job
ends, then closes. Changes arrive through the same Redis pub/sub
as sync waits, so any API process can serve any job's stream.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from api import openapi
from api.deps import CurrentPrincipal, Links
from api.errors import ERRORS
from api.sse import Frame, event_stream
from shared.core.db import unit_of_work
from shared.jobs.models import FINISHED
from shared.jobs.service import get_job, job_images, queue_position
from shared.jobs.views import render_job

router = APIRouter(tags=["jobs"])


@router.get(
    "/v1/images/jobs/{job_id}/events",
    response_class=Response,
    responses={
        **openapi.event_stream(
            "`job.queued`, `job.running`, `job.progress` (local models' steps) and, "
            "last, `job.succeeded`, `job.failed` or `job.canceled`; each `data` is the job"
        ),
        **ERRORS,
    },
)
async def job_events(
    job_id: str,
    request: Request,
    principal: CurrentPrincipal,
    links: Links,
) -> StreamingResponse:
    def snapshot() -> Frame:
        with unit_of_work() as session:
            job = get_job(session, principal.project_id, job_id)
            images = job_images(session, job) if job.status in FINISHED else []
            position = queue_position(session, job)
        obj = render_job(
            job,
            images,
            links.storage,
            links.base_url,
            links.expiry,
            retention_seconds=principal.image_retention_seconds,
        )
        obj.queue_position = position
        # While a local model denoises, each recorded step is a `job.progress` event
        # (the worker throttles them, IMAGEGEN_PROGRESS_INTERVAL_SECONDS).
        steps = obj.progress if obj.status == "running" else None
        return Frame(
            name="job.progress" if steps else f"job.{obj.status}",
            data=obj.model_dump(mode="json", exclude_none=True),
            state=(obj.status, position, steps.step if steps else None, obj.status_detail),
            final=obj.status in FINISHED,
        )

    first = await run_in_threadpool(snapshot)  # a 404 here, before the stream starts
    return event_stream(
        request.app.state.waiter,
        job_id,
        first,
        snapshot,
        scope=links.base_url,  # the job's links name the host asked
        owner=principal.key_id,
    )
