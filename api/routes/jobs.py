"""Jobs you can poll, list, cancel and delete. Every query is scoped to the caller's
project."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import After, CurrentPrincipal, DbSession, Links, StorageDep
from api.errors import ERRORS
from shared.core.schemas import Deleted
from shared.jobs.models import JobStatus
from shared.jobs.schemas import JobList, JobObject
from shared.jobs.service import (
    cancel_job,
    delete_job,
    get_job,
    job_images,
    list_jobs,
    queue_position,
)
from shared.jobs.views import render_job, render_list

router = APIRouter(prefix="/v1/images/jobs", tags=["jobs"])


@router.get(
    "/{job_id}", response_model=JobObject, response_model_exclude_none=True, responses=ERRORS
)
def read_job(
    job_id: str,
    principal: CurrentPrincipal,
    session: DbSession,
    links: Links,
) -> JobObject:
    job = get_job(session, principal.project_id, job_id)
    # Fresh presigned URLs on every read.
    obj = render_job(
        job,
        job_images(session, job),
        links.storage,
        links.base_url,
        links.expiry,
        retention_seconds=principal.image_retention_seconds,
    )
    obj.queue_position = queue_position(session, job)
    return obj


@router.get("", response_model=JobList, response_model_exclude_none=True, responses=ERRORS)
def read_jobs(
    principal: CurrentPrincipal,
    session: DbSession,
    links: Links,
    limit: Annotated[int, Query(ge=1, le=100, description="Objects per page")] = 20,
    after: After = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status")] = None,
) -> JobList:
    jobs, has_more = list_jobs(
        session, principal.project_id, limit=limit, after=after, status=status
    )
    page = render_list(jobs, has_more, links.storage, links.base_url, links.expiry)
    for job, obj in zip(jobs, page.data, strict=True):
        obj.queue_position = queue_position(session, job)
    return page


@router.post(
    "/{job_id}/cancel", response_model=JobObject, response_model_exclude_none=True, responses=ERRORS
)
def cancel(
    job_id: str,
    principal: CurrentPrincipal,
    session: DbSession,
    links: Links,
) -> JobObject:
    job = cancel_job(session, principal.project_id, job_id)
    return render_job(
        job,
        job_images(session, job),
        links.storage,
        links.base_url,
        links.expiry,
        retention_seconds=principal.image_retention_seconds,
    )


@router.delete("/{job_id}", response_model=Deleted, responses=ERRORS)
def delete(
    job_id: str, principal: CurrentPrincipal, session: DbSession, storage: StorageDep
) -> Deleted:
    """Delete the job: canceled first if it has not finished, then its images, edit
    inputs and kept upstream images removed from storage at once; from then on it
    answers 404 (a second delete too), lists skip it and its image URLs answer 404."""
    return delete_job(session, storage, principal.project_id, job_id, principal.key_id)
