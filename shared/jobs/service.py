"""Job service: create, read, list and cancel jobs, scoped to a project.

Services only flush; the caller's boundary (request, task) commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.core.broker import publish_job, publish_upstream_cancel
from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.db import unit_of_work
from shared.core.errors import (
    Conflict,
    NotFound,
)
from shared.core.events import publish_changed
from shared.core.logs import current
from shared.core.outbox import after_commit
from shared.core.pages import newest_first, owned
from shared.core.storage import Storage, input_key
from shared.imaging import CONTENT_TYPES, InputImage
from shared.jobs import lifecycle
from shared.jobs.models import Image, Job, JobStatus
from shared.jobs.submission import Submission
from shared.projects.budgets import get_budgets
from shared.projects.limits import get_limiter
from shared.traces.models import Call
from shared.traces.service import finish_call, start_call
from shared.webhooks.events import record_job_event

# Built once, as every statement of a job's path (ARCHITECTURE.md, "A job"; the
# job's own insert is lifecycle.create's).
_INSERT_CALL = sa.insert(table(Call))


def create_job(session: Session, submission: Submission, *, reply: bool = False) -> Job:
    """Record the submission's job (and its trace call unless it is not tracked).
    ``reply``: a request waits for it (the worker leaves it the result)."""
    principal, params, spec, webhook = (
        submission.principal,
        submission.params,
        submission.spec,
        submission.webhook,
    )
    job = Job(
        id=submission.job_id,
        project_id=principal.project_id,
        key_id=principal.key_id,
        request_id=current("request_id"),
        surface=submission.surface,
        model=spec.name,
        queue=spec.queue,
        request=params.model_dump(),
        webhook_url=webhook.url if webhook else None,
        webhook_events=webhook.events if webhook else None,
        # Optimistic: published right after commit, and cleared if the broker refuses
        # (saving a write per request). If the process dies in between, the sweeper
        # re-publishes after redeliver_after_seconds.
        published_at=utcnow(),
    )
    call = None
    if submission.track:
        inputs = submission.call_inputs
        if inputs is None:
            inputs = params.model_dump(exclude_none=True)
        call = start_call(job, op_name=submission.op_name, inputs=inputs, wb_user_id=principal.user)
    # Core inserts: one statement per row, none of the ORM's flush work on the
    # API's hot path.
    lifecycle.create(session, [job.model_dump()])
    if call is not None:
        session.execute(_INSERT_CALL, [call.model_dump()])
    after_commit(session, lambda: send_job(job.id, job.queue, reply))
    return job


def send_job(job_id: str, queue: str, reply: bool = False) -> None:
    """After commit: hand "run job X" to the broker. If it refuses, the job is marked
    unpublished (its own short transaction) for the sweeper to publish later."""
    if not publish_job(job_id, queue, reply):
        with unit_of_work() as session:
            lifecycle.mark_unpublished(session, job_id)


def get_job(session: Session, project_id: str, job_id: str) -> Job:
    return owned(
        session,
        Job,
        project_id,
        job_id,
        NotFound(f"No job found with id '{job_id}'.", param="job_id"),
    )


def job_images(session: Session, job: Job) -> list[Image]:
    return images_by_job(session, job.project_id, [job.id])[job.id]


def images_by_job(
    session: Session, project_id: str, job_ids: Sequence[str]
) -> dict[str, list[Image]]:
    """``job_images`` for many jobs in a few queries (a batch's output file has one
    line per job: one query each made finalizing a 10,000-line batch take ~20 s)."""
    found: dict[str, list[Image]] = {job_id: [] for job_id in job_ids}
    ids = list(found)
    for start in range(0, len(ids), 5000):  # well under PostgreSQL's bind limit
        for image in session.exec(
            select(Image)
            .where(
                col(Image.project_id) == project_id,
                col(Image.job_id).in_(ids[start : start + 5000]),
            )
            .order_by(col(Image.job_id), col(Image.index))
        ):
            found[image.job_id].append(image)
    return found


def list_jobs(
    session: Session, project_id: str, *, limit: int, after: str | None, status: JobStatus | None
) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.project_id == project_id)
    if status is not None:
        query = query.where(col(Job.status) == status)
    return newest_first(session, query, col(Job.id), limit=limit, after=after)


def cancel_job(session: Session, project_id: str, job_id: str) -> Job:
    """Queued: it never runs. Running: it ends canceled and its result is discarded."""
    job = get_job(session, project_id, job_id)
    changed = lifecycle.cancel(session, job.id, utcnow())
    session.refresh(job)
    if not changed:
        if job.status != JobStatus.canceled:
            raise Conflict(f"Job '{job_id}' has already {job.status}.", param="job_id")
        return job  # canceled before: idempotent, no second event
    finish_call(session, job, output=None, exception="canceled", usage=None)
    record_job_event(session, job, [])
    after_commit(session, lambda: get_limiter().release_job(project_id, job.id))
    after_commit(session, lambda: get_budgets().release([job.id]))  # its cost never comes
    after_commit(session, lambda: publish_changed(job.id, job.status))
    if job.upstream:  # submitted to a queue provider: stop it there too (issue 27)
        after_commit(session, partial(publish_upstream_cancel, job.id, job.queue))
    return job


def queue_position(session: Session, job: Job) -> int | None:
    """Jobs of the same queue created before this one and still queued, plus one.

    Cheap (an index range count on queue, status, id) and approximate: FIFO by
    creation, ignoring messages a worker has reserved, re-queued retries and
    other queues' workers."""
    if job.status != JobStatus.queued:
        return None
    ahead = session.execute(
        sa.select(sa.func.count())
        .select_from(Job)
        .where(
            col(Job.queue) == job.queue, col(Job.status) == JobStatus.queued, col(Job.id) < job.id
        )
    ).scalar_one()
    return int(ahead) + 1


def store_inputs(
    storage: Storage,
    project_id: str,
    job_id: str,
    images: list[InputImage],
    mask: InputImage | None,
) -> tuple[list[str], str | None]:
    """An edit's uploads, stored under its job before the job is recorded (a worker
    that takes the job finds them there); their keys, for the job's request."""
    keys = []
    for i, image in enumerate(images):
        key = input_key(project_id, job_id, f"input-{i}", image.fmt)
        storage.put(key, image.data, CONTENT_TYPES[image.fmt])
        keys.append(key)
    mask_key = None
    if mask is not None:
        mask_key = input_key(project_id, job_id, "mask", "png")
        storage.put(mask_key, mask.data, CONTENT_TYPES["png"])
    return keys, mask_key


def active_jobs(session: Session) -> list[tuple[str, str, str, int]]:
    """(status, model, queue, count) of the queued and running jobs of every project:
    the operator's gauges (metrics), not any project's view."""
    rows = session.execute(
        sa.select(col(Job.status), col(Job.model), col(Job.queue), sa.func.count())
        .where(col(Job.status).in_((JobStatus.queued, JobStatus.running)))
        .group_by(col(Job.status), col(Job.model), col(Job.queue))
    ).all()
    return [(str(a), str(b), str(c), int(n)) for a, b, c, n in rows]
