"""The outbox sweeper: nothing accepted is lost.

Every ``sweep_interval_seconds`` it
1. re-queues running jobs whose lease expired (their worker died), and
2. publishes queued jobs that never reached the broker (published_at is NULL:
   the broker was down when the API accepted them) or whose message was
   published long ago and never picked up (lost in a broker restart). The
   latter only for queues the broker reports empty: while messages still wait,
   an old job's message is most likely among them, and re-publishing a long
   backlog every few minutes would flood the queue with duplicates.
3. ends jobs past their deadline (Cancel-After) that no worker took, or whose
   worker stopped beating (``end_overdue``: canceled, ``deadline_exceeded``,
   never charged), a few hundred a sweep;
4. settles budget reservations whose settle was lost (a worker died between the
   job's commit and its settle, or Redis refused the settle): the few held past
   five minutes, from their jobs' rows (``settle_held``);
5. every ``purge_interval_seconds`` publishes ``imagegen.purge`` (retention and
   orphans, shared/retention/periodic.py), once across every sweeper with Redis.
Several sweepers (one per worker process) may run at once: each step is a
guarded UPDATE, and a duplicate message only finds the job already claimed.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import col, select

from shared.batches.models import PUMPED, Batch, BatchStatus
from shared.core.broker import (
    publish_batch_validation,
    publish_deliveries,
    publish_job,
    publish_purge,
    publish_upstream_cancel,
    queue_size,
)
from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.outbox import after_commit
from shared.core.settings import get_settings
from shared.idempotency.service import purge_expired
from shared.jobs import lifecycle
from shared.jobs.models import Job, JobStatus
from shared.jobs.service import end_overdue
from shared.projects.budgets import get_budgets
from shared.retention.periodic import purge_due
from shared.webhooks.models import DeliveryStatus, WebhookDelivery
from worker.batches import pump_batch, refinalize

log = logging.getLogger(__name__)
BATCH = 500


def requeue_expired() -> int:
    with unit_of_work() as session:
        return lifecycle.requeue_expired(session, utcnow())


def publish_pending() -> int:
    settings = get_settings()
    now = utcnow()
    # A fresh job is published by the API itself; give it a moment before stepping in.
    fresh = now - timedelta(seconds=2)
    stale = now - timedelta(seconds=settings.redeliver_after_seconds)
    with unit_of_work() as session:
        jobs = list(
            session.exec(
                select(Job)
                .where(col(Job.status) == JobStatus.queued, Job.created_at < fresh)
                .where(sa.or_(col(Job.published_at).is_(None), col(Job.published_at) < stale))
                .order_by(col(Job.created_at))
                .limit(BATCH)
            )
        )
    waiting: dict[str, int | None] = {}
    due = []
    for job in jobs:
        if job.published_at is not None:  # stale, not unpublished
            queue = job.queue
            if queue not in waiting:
                waiting[queue] = queue_size(queue)
            if waiting[queue] != 0:
                continue
        due.append(job)
    published = [job.id for job in due if publish_job(job.id, job.queue)]
    if published:
        with unit_of_work() as session:
            lifecycle.mark_published(session, published, utcnow())
    return len(published)


def publish_due_deliveries() -> int:
    """Send webhook attempts that are due and have no fresh message on the way."""
    now = utcnow()
    stale = now - timedelta(seconds=max(30.0, get_settings().sweep_interval_seconds * 6))
    with unit_of_work() as session:
        due = list(
            session.execute(
                sa.select(col(WebhookDelivery.id))
                .where(
                    col(WebhookDelivery.status) == DeliveryStatus.pending,
                    col(WebhookDelivery.next_attempt_at) <= now,
                    sa.or_(
                        col(WebhookDelivery.lease_expires_at).is_(None),
                        col(WebhookDelivery.lease_expires_at) < now,
                    ),
                    sa.or_(
                        col(WebhookDelivery.dispatched_at).is_(None),
                        col(WebhookDelivery.dispatched_at) < stale,
                    ),
                )
                .limit(BATCH)
            ).scalars()
        )
        if due:
            session.execute(
                sa.update(WebhookDelivery)
                .where(col(WebhookDelivery.id).in_(due))
                .values(dispatched_at=now)
            )
            after_commit(session, lambda: publish_deliveries(due))
    return len(due)


def tend_batches() -> None:
    """Resume batches after any restart: validate what was never validated, pump
    open batches, finalize again what died while finalizing."""
    now = utcnow()
    stale = now - timedelta(seconds=max(30.0, get_settings().sweep_interval_seconds * 6))
    with unit_of_work() as session:
        rows = session.execute(
            sa.select(col(Batch.id), col(Batch.status)).where(
                sa.or_(
                    col(Batch.status).in_(PUMPED),
                    sa.and_(
                        col(Batch.status) == BatchStatus.validating, col(Batch.created_at) < stale
                    ),
                    sa.and_(
                        col(Batch.status) == BatchStatus.finalizing,
                        col(Batch.finalizing_at) < stale - timedelta(minutes=5),
                    ),
                )
            )
        ).all()
    for batch_id, status in rows:
        if status == BatchStatus.validating:
            publish_batch_validation(batch_id)
        elif status == BatchStatus.finalizing:
            refinalize(batch_id)
        else:
            pump_batch(batch_id)


def settle_held() -> int:
    """Budget reservations held past their settle: one ZRANGEBYSCORE each sweep
    (nothing to read in SQL unless some are), at most 500 jobs' rows read when there
    are (shared/projects/budgets.py:Budgets.reconcile)."""
    return get_budgets().reconcile(unit_of_work)


def cancel_upstream_left() -> int:
    """Canceled jobs whose upstream jobs may still run there (a cancel_upstream
    message lost: the broker was down) get one again, a minute on."""
    since = utcnow() - timedelta(seconds=60)
    with unit_of_work() as session:
        rows = session.execute(
            sa.select(col(Job.id), col(Job.queue))
            .where(
                col(Job.upstream_open).is_(True),
                col(Job.status) == JobStatus.canceled,
                col(Job.canceled_at) < since,
            )
            .limit(BATCH)
        ).all()
    for job_id, queue in rows:
        publish_upstream_cancel(job_id, queue)
    return len(rows)


def end_overdue_jobs() -> int:
    """Jobs past their deadline end now, whether or not a worker picks them up."""
    with unit_of_work() as session:
        return len(end_overdue(session))


def sweep_once() -> tuple[int, int]:
    end_overdue_jobs()  # first: an overdue job is not re-queued or re-published
    requeued = requeue_expired()
    published = publish_pending()
    cancel_upstream_left()
    publish_due_deliveries()
    tend_batches()
    settle_held()
    with unit_of_work() as session:
        purge_expired(session)  # idempotency keys past their 24 hours (indexed, cheap)
    if purge_due():  # retention and orphans: a task of its own, every purge interval
        publish_purge()
    if requeued or published:
        log.info("sweeper: re-queued %d expired, published %d pending", requeued, published)
    return requeued, published


def run_forever(stop: threading.Event) -> None:
    interval = get_settings().sweep_interval_seconds
    while not stop.wait(interval):
        try:
            sweep_once()
        except Exception:
            log.exception("sweep failed")


def sweeper_thread(stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=run_forever, args=(stop,), name="sweeper", daemon=True)
    thread.start()
    return thread
