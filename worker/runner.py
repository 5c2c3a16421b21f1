"""Run a job (or a chunk of batch lines): claim, produce, record. The steps live in
worker/claim.py, worker/produce.py and worker/record.py.

Safe to run twice for the same job: the claim is a guarded UPDATE (a finished job
is never re-run, a running one only once its lease expired), storage keys are
deterministic per job and index, and images are written in the same transaction
as the guarded transition to ``succeeded``, so a job ends with exactly ``n``.
"""

from __future__ import annotations

import logging
import threading

from shared.core.broker import publish_job
from shared.core.db import unit_of_work
from shared.core.errors import ImagegenError
from shared.core.events import publish_changed
from shared.core.instruments import COST_USD, JOBS_FINISHED
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.jobs import lifecycle
from shared.jobs.lifecycle import Outcome
from shared.jobs.models import Job, JobStatus
from shared.jobs.replies import leave_reply
from shared.jobs.service import deleted_among, job_prefix, remove_objects
from shared.projects.budgets import get_budgets
from shared.projects.limits import get_limiter
from shared.registry import get_registry
from worker.claim import claim
from worker.leases import LEASES
from worker.produce import produce
from worker.record import Result, exhausted, record
from worker.resources import lines_pool

log = logging.getLogger(__name__)


def run_job(job_id: str, reply: bool = False) -> Outcome:
    """Run the job if it can be claimed; returns how it ended (``skipped``: it could
    not be claimed). ``reply``: a request waits for it; leave it the result
    (shared/jobs/replies.py)."""
    return run_jobs([job_id], reply).get(job_id, Outcome.skipped)


def run_jobs(job_ids: list[str], reply: bool = False) -> dict[str, Outcome]:
    """Run the jobs that can be claimed (a chunk of batch lines, or one job), their
    provider calls side by side, and record them in one transaction."""
    jobs, token = claim(job_ids)
    if not jobs:
        return {}
    runnable = start(jobs, token)
    produced: list[Result | None] = [spent(job) for job in jobs if job not in runnable]
    try:
        if len(runnable) == 1:
            produced.append(produce(runnable[0]))
        elif runnable:
            produced += lines_pool().map(produce, runnable)
    except BaseException:
        for job in jobs:
            LEASES.release(job.id)
        raise
    return finish(jobs, token, produced, reply)


def start(jobs: list[Job], token: str) -> list[Job]:
    """Hold the claimed jobs' leases and tell their watchers they run; returns those
    with attempts left (the others are ``spent``)."""
    limit = get_settings().job_max_attempts
    runnable = [job for job in jobs if job.attempts <= limit]
    for job in jobs:
        LEASES.hold(job.id, token, job.deadline_at)
    for job in runnable:
        if job.batch_id is None:
            publish_changed(job.id, JobStatus.running)
    return runnable


def spent(job: Job) -> Result:
    """The end of a job claimed past its attempts."""
    return exhausted(job, get_settings().job_max_attempts)


def finish(
    jobs: list[Job], token: str, produced: list[Result | None], reply: bool = False
) -> dict[str, Outcome]:
    """Record what an attempt produced (one transaction), release the jobs' leases,
    then what follows each end (replies, events, limits, budgets)."""
    try:
        ended = record(token, [r for r in produced if r is not None])
    finally:
        for job in jobs:
            LEASES.release(job.id)
    by_job = {r.job.id: r for r in produced if r is not None}
    for job in jobs:
        ended.setdefault(job.id, Outcome.discarded)
        _after(job, ended[job.id], by_job.get(job.id), reply)
    _forget_deleted([job for job in jobs if ended[job.id] == Outcome.discarded])
    return ended


def _forget_deleted(discarded: list[Job]) -> None:
    """A job deleted while this attempt ran (issue 29): its end was discarded, and
    what the attempt stored after the delete removed its objects (images, kept
    upstream images) is removed now, so nothing of it outlives the delete."""
    if not discarded:
        return
    with unit_of_work() as session:
        deleted = deleted_among(session, [job.id for job in discarded])
    if deleted:
        prefixes = [job_prefix(job.project_id, job.id) for job in discarded if job.id in deleted]
        try:
            remove_objects(get_storage(), prefixes)
        except ImagegenError as exc:  # storage out: the orphan sweep's, later
            log.warning("could not remove the objects of deleted jobs %s: %s", deleted, exc)


def _after(job: Job, outcome: Outcome, result: Result | None, reply: bool) -> None:
    """What follows one job's recorded end, after the commit."""
    if outcome == Outcome.deferred and result is not None:
        _come_back(job, result, reply)
        return
    if outcome != Outcome.discarded:
        JOBS_FINISHED.labels(outcome, job.model).inc()
    if outcome == Outcome.succeeded and result is not None and result.cost_usd:
        COST_USD.labels(job.model).inc(result.cost_usd)
    if job.batch_id is None:  # batch lines: their batch tells its own progress
        _announce(job, outcome, result if reply else None)


def _come_back(job: Job, result: Result, reply: bool) -> None:
    """A job that found no room at its upstreams, queued again: its message is
    published to come back when its turn is due (a lost one is the sweeper's, once
    due), and watchers see it queued with the reason. A message the broker refused
    leaves the job unpublished: the sweeper's at once, not once its mark is stale."""
    if not publish_job(job.id, job.queue, reply=reply, countdown=result.defer_seconds):
        with unit_of_work() as session:
            lifecycle.mark_unpublished(session, job.id)
    if job.batch_id is None:
        publish_changed(job.id, JobStatus.queued)


def _announce(job: Job, status: Outcome, reply: Result | None) -> None:
    """After the commit: the waiting request's reply (``reply``) or the change alone,
    then the job's limits released, off that request's path."""
    if reply is not None and status != Outcome.discarded:
        leave_reply(job, reply.images, reply.data)  # and announces the change
    else:
        publish_changed(job.id, status)
    if status != Outcome.discarded:
        get_limiter().release_job(job.project_id, job.id)
        # Its budget's reservation settled at the real cost (a failure costs nothing);
        # a model without a price reserved nothing (no round trip for it).
        if _priced(job.model):
            get_budgets().settle(job.id, job.cost_usd if status == Outcome.succeeded else None)


def _priced(model: str) -> bool:
    try:
        return get_registry().get(model).price is not None
    except ImagegenError:  # no longer in the registry: settle, to be sure
        return True


def heartbeat_thread(stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(
        target=LEASES.run_forever, args=(stop,), name="lease-heartbeat", daemon=True
    )
    thread.start()
    return thread
