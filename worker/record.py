"""Recording an attempt: the guarded end of one job or a chunk of batch lines (its
images, trace call, webhook events and batch line in one transaction), retried
while the database is unreachable."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from shared.batches.pump import item_finished, lines_succeeded
from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
from shared.jobs import lifecycle
from shared.jobs.lifecycle import Outcome
from shared.jobs.models import Image, Job, JobStatus
from shared.traces.service import finish_call, normalise_usage
from shared.webhooks.events import record_job_event
from worker.batches import BATCH_TICKS, batch_tick

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What one attempt produced, before the guarded transaction that records it."""

    job: Job
    values: dict[str, Any]
    images: list[Image] = field(default_factory=list)
    # The stored bytes of each image (a waiting request is answered from them).
    data: list[bytes] = field(default_factory=list)


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
        if r.job.batch_id is not None
        and r.values["status"] == JobStatus.succeeded
        and not r.values.get("usage")
        and "progress" not in r.values
    ]
    rest = [r for r in results if not any(r is b for b in bulk)]
    with unit_of_work() as session:
        if bulk:
            done = lifecycle.finish_lines(session, [(r.job, r.images) for r in bulk], token, now)
            lines_succeeded(
                session,
                [r.job.batch_item_id for r in bulk if r.job.id in done and r.job.batch_item_id],
            )
            for r in bulk:
                ended[r.job.id] = Outcome.succeeded if r.job.id in done else Outcome.discarded
        for result in rest:
            job, values = result.job, result.values
            ended[job.id] = _end(session, token, now, result)
            if ended[job.id] == Outcome.discarded:
                continue  # canceled or taken over meanwhile
            if job.batch_id is not None:
                item_finished(session, job)
                continue
            record_job_event(session, job, result.images)
            usage = values.get("usage")
            succeeded = values["status"] == JobStatus.succeeded
            finish_call(
                session,
                job,
                output=_call_output(job, now, usage) if succeeded else None,
                exception=None if succeeded else str(values.get("error_message")),
                usage=usage,
            )
    for result in results:
        job = result.job
        if ended[job.id] == Outcome.discarded:
            continue
        if job.batch_id is not None:  # a job's limits are released by the runner
            BATCH_TICKS.call(job.batch_id, batch_tick)
    return ended


def _end(session: Session, token: str, now: datetime, result: Result) -> Outcome:
    """One job's end, as its result says (the in-memory job then equals its row)."""
    values = result.values
    if values["status"] == JobStatus.succeeded:
        return lifecycle.finish(
            session,
            result.job,
            token,
            now,
            images=result.images,
            usage=values.get("usage"),
            progress=values.get("progress"),
        )
    return lifecycle.fail(
        session,
        result.job,
        token,
        now,
        error_code=values["error_code"],
        error_message=values["error_message"],
        attempts=values.get("attempts"),
    )


def _call_output(job: Job, now: datetime, usage: Any) -> dict[str, Any]:
    """What a trace call keeps as output; image URLs are added fresh on read."""
    output: dict[str, Any] = {"created": int(now.timestamp()), "model": job.model}
    norm = normalise_usage(usage)
    if norm:
        output["usage"] = norm
    return output


def exhausted(job: Job, limit: int) -> Result:
    """A job claimed once more than it may be: it ends here, without a provider call.
    Its earlier attempts each ended without a result (a worker died, a lease was
    lost), so it would most likely fail the same way again."""
    last = f" The last error: {job.error_message}" if job.error_message else ""
    return Result(
        job,
        {
            "status": JobStatus.failed,
            "error_code": "max_attempts_exceeded",
            "error_message": f"The job was attempted {limit} times without finishing.{last}",
            "attempts": limit,
        },
    )  # this claim ran nothing: not an attempt


def record(token: str, results: list[Result]) -> dict[str, Outcome]:
    """Record the attempt's results. While the database is unreachable, wait and try
    again (an outage delays a finished job; it does not cost another provider call).
    Any other failure to record (a value the database refuses) is recorded as the
    job's failure: it would fail the same way on every retry."""
    deadline = time.monotonic() + get_settings().record_retry_seconds
    delay = 0.5
    while True:
        try:
            return finish(token, results)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning(
                "could not record %d job(s), database unreachable (%s); trying again in %.1fs",
                len(results),
                type(exc).__name__,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        except Exception as exc:
            if len(results) > 1:  # a chunk of batch lines: one refused line fails alone
                ended: dict[str, Outcome] = {}
                for result in results:
                    ended.update(record(token, [result]))
                return ended
            if all(r.values["status"] == JobStatus.failed and not r.images for r in results):
                raise  # already the plainest record there is
            log.exception("could not record the result of %s", ", ".join(r.job.id for r in results))
            message = f"internal error: the result could not be recorded ({type(exc).__name__})"
            results = [
                Result(
                    r.job,
                    {
                        "status": JobStatus.failed,
                        "error_code": "internal_error",
                        "error_message": message,
                    },
                )
                for r in results
            ]
