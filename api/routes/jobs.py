"""Jobs you can poll, list and cancel. Every query is scoped to the caller's project."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from api.deps import BaseUrl, CurrentPrincipal, SettingsDep, StorageDep
from api.routes.images import ERRORS
from shared.core.broker import publish_deliveries
from shared.core.db import session_scope
from shared.core.events import publish_job_changed
from shared.jobs.schemas import JobList, JobObject
from shared.jobs.service import cancel_job, get_job, job_images, list_jobs, queue_position
from shared.jobs.views import render_job, render_list
from shared.projects.limits import get_limiter

router = APIRouter(prefix="/v1/images/jobs", tags=["jobs"])
JobStatusName = Annotated[
    str | None,
    Query(pattern="^(queued|running|succeeded|failed|canceled)$"),
]


@router.get("/{job_id}", response_model=JobObject, response_model_exclude_none=True,
            responses=ERRORS)
def read_job(job_id: str, principal: CurrentPrincipal, settings: SettingsDep,
             storage: StorageDep, base_url: BaseUrl) -> JobObject:
    with session_scope() as session:
        job = get_job(session, principal.project_id, job_id)
        images = job_images(session, job)
        position = queue_position(session, job)
    # Fresh presigned URLs on every read.
    obj = render_job(job, images, storage, base_url, settings.url_expiry_seconds)
    obj.queue_position = position
    return obj


@router.get("", response_model=JobList, response_model_exclude_none=True, responses=ERRORS)
def read_jobs(principal: CurrentPrincipal, settings: SettingsDep, storage: StorageDep,
              base_url: BaseUrl,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(max_length=64)] = None,
              status: JobStatusName = None) -> JobList:
    with session_scope() as session:
        jobs, has_more = list_jobs(session, principal.project_id, limit=limit, after=after,
                                   status=status)
        positions = {job.id: queue_position(session, job) for job in jobs}
    page = render_list(jobs, has_more, storage, base_url, settings.url_expiry_seconds)
    for obj in page.data:
        obj.queue_position = positions[obj.id]
    return page


@router.post("/{job_id}/cancel", response_model=JobObject, response_model_exclude_none=True,
             responses=ERRORS)
async def cancel(job_id: str, principal: CurrentPrincipal, settings: SettingsDep,
                 storage: StorageDep, base_url: BaseUrl) -> JobObject:
    def do() -> JobObject:
        with session_scope() as session:
            job, deliveries = cancel_job(session, principal.project_id, job_id)
            images = job_images(session, job)
        publish_deliveries(deliveries)
        return render_job(job, images, storage, base_url, settings.url_expiry_seconds)

    job = await run_in_threadpool(do)
    await run_in_threadpool(get_limiter().release_job, principal.project_id, job.id)
    await run_in_threadpool(publish_job_changed, job.id, job.status)
    return job
