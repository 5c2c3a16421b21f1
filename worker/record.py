"""Recording an attempt: the guarded end of one job or a chunk of batch lines (its
images, trace call, webhook events and batch line in one transaction), retried
while the database is unreachable."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from shared.batches.pump import item_finished, lines_succeeded
from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
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


def finish(token: str, results: list[Result]) -> dict[str, str]:
    """The guarded end of an attempt, for one job or a chunk of batch lines: each job
    with its images, trace call, webhook events and batch line, in one transaction.
    Returns the status each job ended in ('discarded' when its lease was lost)."""
    now = utcnow()
    ended: dict[str, str] = {}
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
            done = set(
                session.execute(
                    sa.update(Job)
                    .where(
                        col(Job.id).in_([r.job.id for r in bulk]),
                        col(Job.status) == JobStatus.running,
                        col(Job.lease_token) == token,
                    )
                    .values(
                        status=JobStatus.succeeded,
                        finished_at=now,
                        lease_token=None,
                        lease_expires_at=None,
                    )
                    .returning(col(Job.id))
                    .execution_options(synchronize_session=False)
                ).scalars()
            )
            rows = [image.model_dump() for r in bulk if r.job.id in done for image in r.images]
            if rows:
                session.execute(_INSERT_IMAGES, rows)
            lines_succeeded(
                session,
                [r.job.batch_item_id for r in bulk if r.job.id in done and r.job.batch_item_id],
            )
            for r in bulk:
                ended[r.job.id] = JobStatus.succeeded if r.job.id in done else "discarded"
        for result in rest:
            job, values = result.job, result.values
            # Core statements (the table, not the model), built once per set of
            # columns: no ORM bookkeeping and no statement construction per job.
            outcome = session.execute(
                _end_statement(tuple(sorted(values))),
                {**values, "_id": job.id, "_token": token, "_now": now},
            )
            if outcome.rowcount != 1:  # type: ignore[attr-defined]
                ended[job.id] = "discarded"  # canceled or taken over meanwhile
                continue
            ended[job.id] = str(values["status"])
            if result.images:
                session.execute(_INSERT_IMAGES, [i.model_dump() for i in result.images])
            # The in-memory job now equals the row just written: no need to read it back.
            for name, value in {
                **values,
                "finished_at": now,
                "lease_token": None,
                "lease_expires_at": None,
            }.items():
                setattr(job, name, value)
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
        if ended[job.id] == "discarded":
            continue
        if job.batch_id is not None:  # a job's limits are released by the runner
            BATCH_TICKS.call(job.batch_id, batch_tick)
    return ended


_JOBS = table(Job)
_INSERT_IMAGES = sa.insert(table(Image))


@lru_cache
def _end_statement(columns: tuple[str, ...]) -> sa.Update:
    """The guarded UPDATE that ends one job's attempt, setting ``columns``: built once
    per set of columns (a statement built per call costs its construction and its
    cache key again; measured about a third of recording a job)."""
    return (
        sa.update(_JOBS)
        .where(
            _JOBS.c.id == sa.bindparam("_id"),
            _JOBS.c.status == JobStatus.running,
            _JOBS.c.lease_token == sa.bindparam("_token"),
        )
        .values(
            finished_at=sa.bindparam("_now"),
            lease_token=None,
            lease_expires_at=None,
            **{name: sa.bindparam(name) for name in columns},
        )
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


def record(token: str, results: list[Result]) -> dict[str, str]:
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
                ended: dict[str, str] = {}
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
