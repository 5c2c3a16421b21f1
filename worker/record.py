"""Recording an attempt: the guarded end of one job or a chunk of batch lines (its
images, trace call, webhook events and batch line in one transaction), retried
while the database is unreachable."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from shared.batches.pump import item_finished, lines_succeeded
from shared.core import retry
from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
from shared.jobs import lifecycle
from shared.jobs.lifecycle import Outcome
from shared.jobs.models import Image, Job
from shared.traces.service import finish_call, normalise_usage
from shared.webhooks.events import record_job_event
from worker.batches import BATCH_TICKS, batch_tick

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What one attempt produced, before the guarded transaction that records it:
    a success (its images, usage, last progress) or a failure (its error)."""

    job: Job
    succeeded: bool
    images: list[Image] = field(default_factory=list)
    # The stored bytes of each image (a waiting request is answered from them).
    data: list[bytes] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    # Set when the attempt ends the job's attempts outright (exhausted).
    attempts: int | None = None
    served_by: dict[str, str] | None = None
    cost_usd: float | None = None
    # Set when nothing was called for want of room at any deployment: the job waits
    # this many seconds queued (error_message says why).
    defer_seconds: float | None = None

    @classmethod
    def failure(cls, job: Job, code: str, message: str, attempts: int | None = None) -> Result:
        return cls(job, False, error_code=code, error_message=message, attempts=attempts)

    @classmethod
    def deferred(cls, job: Job, seconds: float, why: str) -> Result:
        return cls(job, False, error_message=why, defer_seconds=seconds)


def finish(token: str, results: list[Result]) -> dict[str, Outcome]:
    """The guarded end of an attempt, for one job or a chunk of batch lines: each job
    with its images, trace call, webhook events and batch line, in one transaction.
    Returns how each job ended (``discarded`` when its lease was lost)."""
    now = utcnow()
    ended: dict[str, Outcome] = {}
    # Succeeded batch lines (the bulk of a big batch) are recorded with one
    # statement each for jobs, images and lines; the rest one by one below.
    bulk = [
        r
        for r in results
        if r.job.batch_id is not None and r.succeeded and not r.usage and r.progress is None
    ]
    rest = [r for r in results if not any(r is b for b in bulk)]
    with unit_of_work() as session:
        done: set[str] = set()
        # One statement per group served alike (one deployment, one cost): a batch
        # of one model is one group.
        for group in _alike(bulk):
            served_by, cost_usd = group[0].served_by, group[0].cost_usd
            lines = [(r.job, r.images) for r in group]
            done |= lifecycle.finish_lines(session, lines, token, now, served_by, cost_usd)
        if bulk:
            lines_succeeded(
                session,
                [r.job.batch_item_id for r in bulk if r.job.id in done and r.job.batch_item_id],
            )
            for r in bulk:
                ended[r.job.id] = Outcome.succeeded if r.job.id in done else Outcome.discarded
        for result in rest:
            ended[result.job.id] = _record_one(session, token, now, result)
    for result in results:
        job = result.job
        if ended[job.id] in (Outcome.discarded, Outcome.deferred):
            continue
        if job.batch_id is not None:  # a job's limits are released by the runner
            BATCH_TICKS.call(job.batch_id, batch_tick)
    return ended


def _alike(results: list[Result]) -> list[list[Result]]:
    groups: dict[tuple[str, float | None], list[Result]] = {}
    for result in results:
        key = (json.dumps(result.served_by, sort_keys=True), result.cost_usd)
        groups.setdefault(key, []).append(result)
    return list(groups.values())


def _record_one(session: Session, token: str, now: datetime, result: Result) -> Outcome:
    """One job's end, then what follows it: its batch line, or its webhook events
    and trace call."""
    job = result.job
    if result.defer_seconds is not None:  # nothing ran: queued again, nothing to tell
        due = now + timedelta(seconds=result.defer_seconds)
        return lifecycle.defer(session, job, token, result.error_message or "", due)
    outcome = _end(session, token, now, result)
    if outcome == Outcome.discarded:
        return outcome  # canceled or taken over meanwhile
    if job.batch_id is not None:
        item_finished(session, job)
        return outcome
    record_job_event(session, job, result.images)
    finish_call(
        session,
        job,
        output=_call_output(job, now, result.usage) if result.succeeded else None,
        exception=None if result.succeeded else str(result.error_message),
        usage=result.usage,
    )
    return outcome


def _end(session: Session, token: str, now: datetime, result: Result) -> Outcome:
    """One job's end, as its result says (the in-memory job then equals its row)."""
    if result.succeeded:
        return lifecycle.finish(
            session,
            result.job,
            token,
            now,
            images=result.images,
            usage=result.usage,
            progress=result.progress,
            served_by=result.served_by,
            cost_usd=result.cost_usd,
        )
    return lifecycle.fail(
        session,
        result.job,
        token,
        now,
        error_code=result.error_code or "internal_error",
        error_message=result.error_message or "",
        attempts=result.attempts,
    )


def _call_output(job: Job, now: datetime, usage: Any) -> dict[str, Any]:
    """What a trace call keeps as output; image URLs are added fresh on read."""
    output: dict[str, Any] = {"created": int(now.timestamp()), "model": job.model}
    norm = normalise_usage(usage)
    if norm:
        output["usage"] = norm
    if job.served_by:
        output["served_by"] = job.served_by
    if job.cost_usd is not None:
        output["cost_usd"] = job.cost_usd
    return output


def exhausted(job: Job, limit: int) -> Result:
    """A job claimed once more than it may be: it ends here, without a provider call.
    Its earlier attempts each ended without a result (a worker died, a lease was
    lost), so it would most likely fail the same way again."""
    last = f" The last error: {job.error_message}" if job.error_message else ""
    return Result.failure(
        job,
        "max_attempts_exceeded",
        f"The job was attempted {limit} times without finishing.{last}",
        attempts=limit,  # this claim ran nothing: not an attempt
    )


def record(token: str, results: list[Result]) -> dict[str, Outcome]:
    """Record the attempt's results. While the database is unreachable, wait and try
    again (an outage delays a finished job; it does not cost another provider call).
    Any other failure to record (a value the database refuses) is recorded as the
    job's failure: it would fail the same way on every retry."""
    policy = retry.database_records(get_settings())
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return finish(token, results)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            if policy.exhausted(attempt, started):
                raise
            delay = policy.delay(attempt)
            log.warning(
                "could not record %d job(s), database unreachable (%s); trying again in %.1fs",
                len(results),
                type(exc).__name__,
                delay,
            )
            time.sleep(delay)
        except Exception as exc:
            if len(results) > 1:  # a chunk of batch lines: one refused line fails alone
                ended: dict[str, Outcome] = {}
                for result in results:
                    ended.update(record(token, [result]))
                return ended
            if all(not r.succeeded and not r.images for r in results):
                raise  # already the plainest record there is
            log.exception("could not record the result of %s", ", ".join(r.job.id for r in results))
            message = f"internal error: the result could not be recorded ({type(exc).__name__})"
            results = [Result.failure(r.job, "internal_error", message) for r in results]
