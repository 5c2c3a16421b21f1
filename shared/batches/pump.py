
from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from shared.batches.models import Batch, BatchItem
from shared.batches.results import finalize
from shared.core.broker import publish_jobs
from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.db import session_scope
from shared.core.errors import ImagegenError
from shared.core.ids import new_id
from shared.core.settings import get_settings
from shared.jobs.input import parse_request, validate_generation
from shared.jobs.models import Job, JobStatus
from shared.jobs.schemas import GenerationParams
from shared.jobs.views import job_failure
from shared.projects.limits import get_limiter, images_per_day_exceeded
from shared.projects.models import Project
from shared.registry import get_registry


def pump(batch_id: str) -> int:
    """Top the batch up to its in-flight bound; finalize it once nothing is left."""
    settings = get_settings()
    bound = settings.batch_max_in_flight
    registry = get_registry()
    created: list[str] = []
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status not in ("in_progress", "cancelling", "expiring"):
            return 0
        now = utcnow()
        if batch.status == "in_progress" and batch.expires_at and batch.expires_at < now:
            _stop_pending(session, batch, "batch_expired",
                          "The batch expired before this request ran.")
            batch.status = "expiring"
            session.add(batch)
        in_flight = _count(session, batch.id, "queued")
        room = bound - in_flight
        pending: list[sa.Row[Any]] = []
        if batch.status == "in_progress" and room >= max(1, bound // 4):
            pending = list(session.execute(
                sa.select(col(BatchItem.id), col(BatchItem.body))
                .where(col(BatchItem.batch_id) == batch.id, col(BatchItem.status) == "pending")
                .order_by(col(BatchItem.line)).limit(room)
                .with_for_update(skip_locked=True)).all())
        valid: list[tuple[str, GenerationParams, str]] = []
        for item_id, body in pending:
            try:
                params = validate_generation(parse_request(body), registry)
                valid.append((item_id, params, registry.get(params.model).name))
            except ImagegenError as exc:
                _fail_item(session, item_id, exc, now)
        jobs = _queue_lines(session, batch, valid, now) if valid else []
        created = [job["id"] for job in jobs]
        finished = not created and in_flight == 0 and _count(session, batch.id, "pending") == 0
    # Lines run in chunks: one message, one claim and one finishing transaction per
    # chunk instead of per line (if a message is lost, the job sweeper re-publishes
    # its jobs one by one).
    size = max(1, settings.batch_chunk_size)
    for start in range(0, len(created), size):
        publish_jobs(created[start:start + size], settings.batch_queue)
    if finished:
        finalize(batch_id)
    return len(created)



def _queue_lines(session: Session, batch: Batch, valid: list[tuple[str, GenerationParams, str]],
                 now: datetime) -> list[dict[str, Any]]:
    """Jobs for validated lines, as far as the project's images a day allow (lines
    past it fail with its 429, like any request; the rest of the batch goes on)."""
    project = session.get(Project, batch.project_id)
    quota = project.images_per_day if project else None
    granted = get_limiter().take_images(batch.project_id, quota,
                                        [params.n for _, params, _ in valid])
    for item_id, _, _ in valid[granted:]:
        _fail_item(session, item_id, images_per_day_exceeded(quota), now)
    # Plain rows and two executemany statements: the ORM's unit of work for
    # hundreds of new jobs per second was a fifth of a batch worker's CPU.
    template = Job(id="", project_id=batch.project_id, surface="batch", model="",
                   queue=get_settings().batch_queue, request={}, batch_id=batch.id,
                   published_at=now, created_at=now).model_dump()
    jobs = [{**template, "id": new_id("job"), "model": model, "request": params.model_dump(),
             "batch_item_id": item_id} for item_id, params, model in valid[:granted]]
    if jobs:
        session.execute(sa.insert(table(Job)), jobs)
        items = table(BatchItem).c
        session.execute(sa.update(table(BatchItem))
                        .where(items.id == sa.bindparam("item_id"))
                        .values(status="queued", job_id=sa.bindparam("new_job_id")),
                        [{"item_id": job["batch_item_id"], "new_job_id": job["id"]}
                         for job in jobs])
    return jobs



def _error_body(err: ImagegenError) -> dict[str, Any]:
    """A line's error as OpenAI's error object."""
    return {"message": err.message, "type": err.error_type, "param": err.param,
            "code": err.code}



def _fail_item(session: Session, item_id: str, exc: ImagegenError, now: datetime) -> None:
    session.execute(sa.update(BatchItem).where(col(BatchItem.id) == item_id).values(
        status="failed", status_code=exc.status_code, finished_at=now, error=_error_body(exc)))



def _count(session: Session, batch_id: str, status: str) -> int:
    return int(session.execute(
        sa.select(sa.func.count()).select_from(BatchItem)
        .where(col(BatchItem.batch_id) == batch_id, col(BatchItem.status) == status)
    ).scalar_one())



def _stop_pending(session: Session, batch: Batch, code: str, message: str) -> None:
    """Items not started end canceled: pending ones, and queued jobs not yet running."""
    now = utcnow()
    error = {"code": code, "message": message}
    session.execute(sa.update(BatchItem)
                    .where(col(BatchItem.batch_id) == batch.id,
                           col(BatchItem.status) == "pending")
                    .values(status="canceled", error=error, finished_at=now))
    queued = list(session.execute(
        sa.update(Job)
        .where(col(Job.batch_id) == batch.id, col(Job.status) == JobStatus.queued)
        .values(status=JobStatus.canceled, canceled_at=now, finished_at=now)
        .returning(col(Job.batch_item_id))).scalars())
    if queued:
        session.execute(sa.update(BatchItem)
                        .where(col(BatchItem.id).in_(queued), col(BatchItem.status) == "queued")
                        .values(status="canceled", error=error, finished_at=now))



def item_finished(session: Session, job: Job) -> None:
    """In the transaction that ends a batch job: keep the line's result."""
    if not job.batch_item_id:
        return
    values: dict[str, Any] = {"finished_at": utcnow()}
    if job.status == JobStatus.succeeded:
        values |= {"status": "succeeded", "status_code": 200}
    elif job.status == JobStatus.canceled:
        values |= {"status": "canceled",
                   "error": {"code": "batch_cancelled", "message": "The batch was cancelled."}}
    else:
        err = job_failure(job)
        values |= {"status": "failed", "status_code": err.status_code,
                   "error": _error_body(err)}
    session.execute(sa.update(BatchItem)
                    .where(col(BatchItem.id) == job.batch_item_id,
                           col(BatchItem.status) == "queued").values(**values))



def lines_succeeded(session: Session, item_ids: list[str]) -> None:
    """``item_finished`` for many succeeded lines at once (a chunk's bulk path)."""
    if item_ids:
        session.execute(sa.update(BatchItem)
                        .where(col(BatchItem.id).in_(item_ids),
                               col(BatchItem.status) == "queued")
                        .values(status="succeeded", status_code=200, finished_at=utcnow())
                        .execution_options(synchronize_session=False))
