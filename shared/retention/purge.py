"""The purge: what is past its time leaves storage and the database, in chunks.

One pass (``purge_once``, the ``imagegen.purge`` task's body) does, a chunk at a time:
1. images past their life (a request's own ``Image-Expires-After``, or their
   project's image retention): their objects, with their job's edit inputs and
   kept upstream images, are deleted (S3 DeleteObjects, up to 1,000 keys a call)
   and the rows marked ``expired_at`` (the job stays readable);
2. the inputs of finished jobs that made no image (an edit failed or canceled),
   once their project's image retention has passed since the job ended (or its
   own ``images_expire_at``): objects deleted, the job's ``input_bytes`` set to 0
   (the mark: it stores nothing now, and is not taken again);
3. files past their ``expires_at``: object deleted, row marked deleted;
4. job rows past their project's job retention (and past their idempotency key's
   24 hours, with no webhook delivery still pending): their objects first, then
   their trace calls, webhook attempts and deliveries, images, idempotency keys and
   the jobs themselves.

Each chunk is one transaction: its rows are claimed (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so several workers purging at once take different rows; SQLite has one
writer), their objects deleted while the claim is held, then the rows marked or
removed and committed. A kill at any point leaves the chunk's rows as they were,
and the next pass takes them again: deleting an object already gone is no error, so
the purge is exact after a rerun. Nothing within its time is ever selected: every
query compares with ``now``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from shared.batches.models import TERMINAL, Batch
from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.storage import Storage
from shared.files.models import File
from shared.idempotency.models import IdempotencyKey
from shared.idempotency.service import KEEP as IDEMPOTENCY_KEEP
from shared.jobs import lifecycle
from shared.jobs.models import FINISHED, Image, Job
from shared.projects.models import Project
from shared.traces.models import Call
from shared.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery

log = logging.getLogger(__name__)

# Rows per transaction: one DeleteObjects call's worth of images (and each
# statement's IN list well under PostgreSQL's bind limit).
CHUNK = 1000
JOB_CHUNK = 500

UnitOfWork = Callable[[], AbstractContextManager[Session]]


class Pacer:
    """Rests between chunks so that a pass works at most ``duty`` of its time (1.0:
    flat out): a purge of 100,000 images is minutes of work at no one's request,
    and the API serving requests on the same hosts and database comes first
    (bench/bench_purge.py measures the API's p50 during a pass)."""

    def __init__(self, duty: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.duty = duty
        self.sleep = sleep
        self.rested = 0.0

    @contextmanager
    def chunk(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if self.duty < 1.0:
            rest = (time.perf_counter() - started) * (1.0 / self.duty - 1.0)
            self.rested += rest
            self.sleep(rest)


@dataclass
class Purged:
    """What one pass removed."""

    images: int = 0
    inputs: int = 0
    files: int = 0
    jobs: int = 0
    objects: int = 0
    delete_calls: int = 0
    chunks: int = 0

    def __bool__(self) -> bool:
        return bool(self.images or self.inputs or self.files or self.jobs)


def _locked(session: Session, query: sa.Select[Any]) -> sa.Select[Any]:
    """Claimed for this transaction, rows another purge holds skipped (PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def job_object_keys(request: dict[str, Any] | None, upstream: dict[str, Any] | None) -> list[str]:
    """A job's objects besides its images: an edit's inputs and mask (keys in its
    request) and a queue provider's kept images (keys in its upstream record)."""
    keys: list[str] = []
    request = request or {}
    images = request.get("images")
    if isinstance(images, list):
        keys += [k for k in images if isinstance(k, str)]
    if isinstance(request.get("mask"), str):
        keys.append(request["mask"])
    for entry in (upstream or {}).values():
        kept = entry.get("kept") if isinstance(entry, dict) else None
        if isinstance(kept, list):
            keys += [k for k in kept if isinstance(k, str)]
    return keys


def _delete(storage: Storage, keys: Iterable[str], purged: Purged) -> None:
    unique = sorted(set(keys))
    if unique:
        purged.delete_calls += storage.delete(unique)
        purged.objects += len(unique)


def _retentions(session: Session, column: Any) -> list[tuple[str, int]]:
    rows = session.execute(sa.select(col(Project.id), column).where(column.is_not(None))).all()
    return [(str(p), int(r)) for p, r in rows]


def _expire_images(
    session: Session, storage: Storage, now: datetime, where: sa.ColumnElement[bool], purged: Purged
) -> int:
    """One chunk of images matching ``where``: objects deleted, rows marked."""
    rows = session.execute(
        _locked(
            session,
            sa.select(col(Image.id), col(Image.storage_key), col(Image.job_id))
            .where(col(Image.expired_at).is_(None), where)
            .limit(CHUNK),
        )
    ).all()
    if not rows:
        return 0
    job_ids = sorted({str(r[2]) for r in rows})
    keys = [str(r[1]) for r in rows]
    for request, upstream in session.execute(
        sa.select(col(Job.request), col(Job.upstream)).where(col(Job.id).in_(job_ids))
    ):
        keys += job_object_keys(request, upstream)
    _delete(storage, keys, purged)
    session.execute(
        sa.update(Image)
        .where(col(Image.id).in_([r[0] for r in rows]), col(Image.expired_at).is_(None))
        .values(expired_at=now)
    )
    purged.images += len(rows)
    purged.chunks += 1
    return len(rows)


def _images_due(session: Session, now: datetime) -> list[sa.ColumnElement[bool]]:
    """Where images are past their time: each project's retention (by when each was
    made), and the requests' own lives (their job's ``images_expire_at``)."""
    wheres: list[sa.ColumnElement[bool]] = [
        sa.and_(
            col(Image.project_id) == project_id,
            col(Image.created_at) < now - timedelta(seconds=seconds),
        )
        for project_id, seconds in _retentions(session, col(Project.image_retention_seconds))
    ]
    wheres.append(
        col(Image.job_id).in_(
            sa.select(col(Job.id)).where(
                col(Job.images_expire_at).is_not(None), col(Job.images_expire_at) <= now
            )
        )
    )
    return wheres


def expire_images(
    storage: Storage, now: datetime, purged: Purged, uow: UnitOfWork, pacer: Pacer
) -> None:
    with uow() as session:
        wheres = _images_due(session, now)
    for where in wheres:
        while True:
            with pacer.chunk(), uow() as session:
                done = _expire_images(session, storage, now, where, purged)
            if done < CHUNK:
                break


def expire_inputs(
    storage: Storage, now: datetime, purged: Purged, uow: UnitOfWork, pacer: Pacer
) -> None:
    """Stored inputs of finished jobs with no image at all (a job with images has
    its inputs deleted with them, step 1): a failed or canceled edit's would
    otherwise stay for good, owned by its row."""
    with uow() as session:
        retentions = _retentions(session, col(Project.image_retention_seconds))
    imageless = ~sa.select(sa.literal(1)).where(col(Image.job_id) == col(Job.id)).exists()
    wheres: list[sa.ColumnElement[bool]] = [
        sa.and_(
            col(Job.project_id) == project_id,
            col(Job.finished_at) < now - timedelta(seconds=seconds),
        )
        for project_id, seconds in retentions
    ]
    wheres.append(sa.and_(col(Job.images_expire_at).is_not(None), col(Job.images_expire_at) <= now))
    for where in wheres:
        while True:
            with pacer.chunk(), uow() as session:
                rows = session.execute(
                    _locked(
                        session,
                        sa.select(col(Job.id), col(Job.request), col(Job.upstream))
                        .where(
                            col(Job.input_bytes) > 0,
                            col(Job.status).in_(FINISHED),
                            col(Job.deleted_at).is_(None),
                            imageless,
                            where,
                        )
                        .limit(JOB_CHUNK),
                    )
                ).all()
                if rows:
                    _delete(storage, [k for r in rows for k in job_object_keys(r[1], r[2])], purged)
                    purged.inputs += lifecycle.inputs_removed(session, [str(r[0]) for r in rows])
                    purged.chunks += 1
            if len(rows) < JOB_CHUNK:
                break


def expire_files(
    storage: Storage, now: datetime, purged: Purged, uow: UnitOfWork, pacer: Pacer
) -> None:
    while True:
        with pacer.chunk(), uow() as session:
            rows = session.execute(
                _locked(
                    session,
                    sa.select(col(File.id), col(File.storage_key))
                    .where(
                        col(File.deleted_at).is_(None),
                        col(File.expires_at).is_not(None),
                        col(File.expires_at) <= now,
                    )
                    .limit(CHUNK),
                )
            ).all()
            if not rows:
                return
            _delete(storage, [str(r[1]) for r in rows], purged)
            session.execute(
                sa.update(File)
                .where(col(File.id).in_([r[0] for r in rows]), col(File.deleted_at).is_(None))
                .values(deleted_at=now)
            )
            purged.files += len(rows)
            purged.chunks += 1
        if len(rows) < CHUNK:
            return


def _remove_jobs(
    session: Session, storage: Storage, job_ids: Sequence[str], purged: Purged
) -> None:
    """A chunk of jobs' objects, then their rows, children first."""
    keys = [
        str(k)
        for k in session.execute(
            sa.select(col(Image.storage_key)).where(
                col(Image.job_id).in_(job_ids), col(Image.expired_at).is_(None)
            )
        ).scalars()
    ]
    for request, upstream in session.execute(
        sa.select(col(Job.request), col(Job.upstream)).where(col(Job.id).in_(job_ids))
    ):
        keys += job_object_keys(request, upstream)
    _delete(storage, keys, purged)
    deliveries = sa.select(col(WebhookDelivery.id)).where(col(WebhookDelivery.job_id).in_(job_ids))
    session.execute(
        sa.delete(WebhookAttempt).where(col(WebhookAttempt.delivery_id).in_(deliveries))
    )
    session.execute(sa.delete(WebhookDelivery).where(col(WebhookDelivery.job_id).in_(job_ids)))
    session.execute(sa.delete(Call).where(col(Call.job_id).in_(job_ids)))
    session.execute(sa.delete(Image).where(col(Image.job_id).in_(job_ids)))
    session.execute(
        sa.delete(IdempotencyKey).where(
            col(IdempotencyKey.resource) == "job", col(IdempotencyKey.resource_id).in_(job_ids)
        )
    )
    purged.jobs += lifecycle.remove_finished(session, job_ids)
    purged.chunks += 1


def remove_jobs(
    storage: Storage, now: datetime, purged: Purged, uow: UnitOfWork, pacer: Pacer
) -> None:
    """Job rows past their project's job retention (counted from creation), finished
    ones only, and a batch's lines only once their batch has ended (its output file
    is written from them). A row also outlives what still answers with it: its
    ``Idempotency-Key`` (a retry gets the job for 24 hours, however short the
    retention) and its webhook deliveries still pending (retried for days)."""
    with uow() as session:
        retentions = _retentions(session, col(Project.job_retention_seconds))
    open_batches = sa.select(col(Batch.id)).where(col(Batch.status).not_in(TERMINAL))
    pending = (
        sa.select(sa.literal(1))
        .where(
            col(WebhookDelivery.job_id) == col(Job.id),
            col(WebhookDelivery.status) == DeliveryStatus.pending,
        )
        .exists()
    )
    for project_id, seconds in retentions:
        # A job's key is written before the job, in its transaction, and lives KEEP
        # from then: a job made over KEEP ago has none left that is live. A cutoff,
        # not a lookup: idempotency_key has no index on the resource it names.
        cutoff = now - max(timedelta(seconds=seconds), IDEMPOTENCY_KEEP)
        while True:
            with pacer.chunk(), uow() as session:
                job_ids = [
                    str(j)
                    for j in session.execute(
                        _locked(
                            session,
                            sa.select(col(Job.id))
                            .where(
                                col(Job.project_id) == project_id,
                                col(Job.created_at) < cutoff,
                                col(Job.status).in_(FINISHED),
                                sa.or_(
                                    col(Job.batch_id).is_(None),
                                    col(Job.batch_id).not_in(open_batches),
                                ),
                                ~pending,
                            )
                            .limit(JOB_CHUNK),
                        )
                    ).scalars()
                ]
                if job_ids:
                    _remove_jobs(session, storage, job_ids, purged)
            if len(job_ids) < JOB_CHUNK:
                break


def purge_once(
    storage: Storage,
    now: datetime | None = None,
    uow: UnitOfWork = unit_of_work,
    duty: float = 1.0,
) -> Purged:
    """One pass over everything past its time (see the module's docstring), working
    at most ``duty`` of the time (``IMAGEGEN_PURGE_DUTY_CYCLE`` in the task)."""
    now = now or utcnow()
    purged = Purged()
    pacer = Pacer(duty)
    expire_images(storage, now, purged, uow, pacer)
    expire_inputs(storage, now, purged, uow, pacer)
    expire_files(storage, now, purged, uow, pacer)
    remove_jobs(storage, now, purged, uow, pacer)
    if purged:
        log.info(
            "purge: %d images expired, %d jobs' inputs, %d files, %d jobs removed "
            "(%d objects, %d calls)",
            purged.images,
            purged.inputs,
            purged.files,
            purged.jobs,
            purged.objects,
            purged.delete_calls,
        )
    return purged
