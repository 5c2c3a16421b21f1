"""Job service: create, read, list and cancel jobs, scoped to a project.

Services only flush; the caller's boundary (request, task) commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import partial

import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.audit.service import record
from shared.core.broker import publish_batch_pump, publish_job, publish_upstream_cancel
from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.db import unit_of_work
from shared.core.durations import parse_duration
from shared.core.errors import (
    Conflict,
    NotFound,
)
from shared.core.events import publish_changed
from shared.core.logs import current
from shared.core.outbox import after_commit
from shared.core.pages import newest_first, owned
from shared.core.schemas import Deleted
from shared.core.storage import Storage, input_key
from shared.imaging import CONTENT_TYPES, InputImage
from shared.jobs import lifecycle
from shared.jobs.models import FINISHED, Image, Job, JobStatus
from shared.jobs.submission import Submission
from shared.projects.budgets import get_budgets
from shared.projects.limits import get_limiter
from shared.registry import get_registry
from shared.retention.policy import images_expire_at
from shared.traces.models import Call
from shared.traces.service import finish_call, forget_calls, start_call
from shared.webhooks.events import record_job_event
from shared.webhooks.service import stop_job_deliveries

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
    now = utcnow()
    deadline = now + timedelta(seconds=submission.cancel_after) if submission.cancel_after else None
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
        published_at=now,
        created_at=now,
        deadline_at=deadline,
        input_bytes=submission.input_bytes,
        images_expire_at=images_expire_at(now, submission.image_life),
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
    query = select(Job).where(Job.project_id == project_id, col(Job.deleted_at).is_(None))
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
    _ended_early(session, job, "canceled")
    return job


def _ended_early(session: Session, job: Job, why: str) -> None:
    """What follows a job ended before its attempt finished (a cancel, its
    deadline): its trace call and event, and after commit its limits and budget
    released (its cost never comes: a reservation released, never settled), the
    waiters told, its queue provider's job canceled there."""
    if job.batch_id is not None:
        # Imported here: the batch pump makes its lines' jobs through this module.
        from shared.batches.pump import item_finished

        item_finished(session, job)  # settles its budget at no cost
        batch_id = job.batch_id
        after_commit(session, lambda: publish_batch_pump(batch_id))
    else:
        finish_call(session, job, output=None, exception=why, usage=None)
        record_job_event(session, job, [])
        after_commit(session, lambda: get_limiter().release_job(job.project_id, job.id))
        after_commit(session, lambda: get_budgets().release([job.id]))
        after_commit(session, lambda: publish_changed(job.id, job.status))
    if job.upstream:  # submitted to a queue provider: stop it there too (issue 27)
        after_commit(session, partial(publish_upstream_cancel, job.id, job.queue))


# --- deadlines (Cancel-After) -------------------------------------------------------

# Cancel-After's bounds: shorter than 5 s could not reach a worker, longer than a
# day outlives any job's sense (and a batch's window).
CANCEL_AFTER_LEAST = 5.0
CANCEL_AFTER_MOST = 24 * 3600.0


def cancel_after(text: str | None, what: str = "Cancel-After") -> float | None:
    """The ``Cancel-After`` header (or a native batch's ``cancel_after``) in seconds;
    None when absent; a 400 naming ``what`` when it is no duration or out of bounds."""
    if text is None:
        return None
    return parse_duration(text, what=what, least=CANCEL_AFTER_LEAST, most=CANCEL_AFTER_MOST)


def end_overdue(
    session: Session, ids: Sequence[str] | None = None, now: datetime | None = None
) -> list[Job]:
    """End the jobs past their deadline (among ``ids``, else any, a few hundred at a
    time) canceled with ``deadline_exceeded``, and release what they held: the
    claim (before anything is sent upstream), the lease heartbeat (a running one)
    and the sweeper (one no worker took) call it."""
    jobs = lifecycle.end_overdue(session, now or utcnow(), ids)
    for job in jobs:
        _ended_early(session, job, "deadline_exceeded")
    return jobs


# --- deletion -----------------------------------------------------------------------


def job_prefix(project_id: str, job_id: str) -> str:
    """Where everything a job stored lives: its images, an edit's inputs and mask,
    a queue provider's kept images (``upstream/``)."""
    return f"{project_id}/{job_id}/"


def remove_objects(storage: Storage, prefixes: Sequence[str]) -> int:
    """Delete every object under ``prefixes`` (S3 DeleteObjects, 1,000 keys a call);
    how many were found."""
    keys = [obj.key for prefix in prefixes for obj in storage.scan(prefix)]
    storage.delete(keys)
    return len(keys)


def deleted_among(session: Session, job_ids: Sequence[str]) -> set[str]:
    """The jobs among ``job_ids`` that were deleted."""
    return set(
        session.execute(
            sa.select(col(Job.id)).where(
                col(Job.id).in_(list(job_ids)), col(Job.deleted_at).is_not(None)
            )
        ).scalars()
    )


def delete_job(
    session: Session, storage: Storage, project_id: str, job_id: str, actor: str
) -> Deleted:
    """Delete a job on demand: canceled first if it has not finished (its queue
    provider's job canceled there), then a tombstone (read as absent from now on),
    its objects removed from storage at once, the deletion audited. A worker that
    finishes it later is discarded (the tombstone is finished) and removes what it
    stored (worker/runner.py). Deleting it again answers 404, as OpenAI does for a
    deleted file."""
    job = get_job(session, project_id, job_id)
    if job.batch_id is not None:
        # A batch line's job is part of its batch's results (its output file, its
        # line pages): deleting it alone would leave the batch pointing at images
        # that are gone. The batch is deleted whole.
        raise Conflict(
            f"Job '{job_id}' is a line of batch '{job.batch_id}': delete the batch "
            "(once it has ended) to delete its jobs.",
            param="job_id",
        )
    if job.status not in FINISHED:
        if lifecycle.cancel(session, job.id, utcnow()):
            session.refresh(job)
            _ended_early(session, job, "deleted")
        else:  # it finished meanwhile
            session.refresh(job)
    if not lifecycle.mark_deleted(session, job.id, utcnow()):  # deleted by a twin
        raise NotFound(f"No job found with id '{job_id}'.", param="job_id")
    # Marked first, in this transaction: a storage outage answers 503 and rolls the
    # mark back, so the client may ask again; a removal that ran twice finds nothing.
    removed = remove_objects(storage, [job_prefix(project_id, job.id)])
    # Its trace call (the prompt, the image links) goes; its deliveries (the whole
    # job) are no longer listed nor sent (shared/webhooks/service.py).
    forget_calls(session, [job.id])
    stop_job_deliveries(session, job.id)
    record(
        session,
        actor,
        "job.delete",
        job.id,
        {"status": str(job.status), "objects": removed, "batch_id": job.batch_id},
        project_id=project_id,
    )
    return Deleted(id=job.id, object="image.job")


def queue_position(session: Session, job: Job) -> int | None:
    """Jobs of the same queue created before this one and still queued, plus one.

    Cheap (an index range count on queue, status, id) and approximate: FIFO by
    creation, ignoring messages a worker has reserved, re-queued retries and
    other queues' workers. A local model's queue is served in turns instead
    (``_turn_position``)."""
    if job.status != JobStatus.queued:
        return None
    if job.queue in get_registry().local_queues:
        return _turn_position(session, job)
    ahead = session.execute(
        sa.select(sa.func.count())
        .select_from(Job)
        .where(
            col(Job.queue) == job.queue, col(Job.status) == JobStatus.queued, col(Job.id) < job.id
        )
    ).scalar_one()
    return int(ahead) + 1


def _turn_position(session: Session, job: Job) -> int:
    """A job's place in a GPU queue's order (worker/gpu/turns.py): interactive jobs
    before batch lines, and within each, projects taking turns: every project's
    first waiting job, then every project's second... The order of the scheduler
    but for its tie between projects at the same turn (who was served last, which
    only it knows): here the older job goes first. Counts the jobs of a
    few projects' in-flight windows, not their whole batches."""
    queued = sa.and_(col(Job.queue) == job.queue, col(Job.status) == JobStatus.queued)
    interactive = job.batch_id is None
    same_kind = col(Job.batch_id).is_(None) if interactive else col(Job.batch_id).is_not(None)
    mine = session.execute(
        sa.select(sa.func.count())
        .select_from(Job)
        .where(queued, same_kind, col(Job.project_id) == job.project_id, col(Job.id) < job.id)
    ).scalar_one()
    turns = (
        sa.select(
            col(Job.id).label("id"),
            sa.func.row_number()
            .over(partition_by=col(Job.project_id), order_by=col(Job.id))
            .label("turn"),
        )
        .where(queued, same_kind)
        .subquery()
    )
    ahead = session.execute(
        sa.select(sa.func.count())
        .select_from(turns)
        .where(
            sa.or_(
                turns.c.turn < mine + 1,
                sa.and_(turns.c.turn == mine + 1, turns.c.id < job.id),
            )
        )
    ).scalar_one()
    if not interactive:  # every interactive job waiting goes first
        ahead += session.execute(
            sa.select(sa.func.count()).select_from(Job).where(queued, col(Job.batch_id).is_(None))
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
