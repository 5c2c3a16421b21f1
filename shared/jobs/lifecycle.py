"""A job's life: every write that moves a job, in one place.

A job is recorded ``queued`` (``create``), taken by a worker's attempt (``claim``),
held by that attempt's lease (``renew``, ``note_progress``, ``set_detail``,
``note_upstream``; ``close_upstream`` once canceled) until
it ends (``finish``, ``finish_lines``, ``fail``) or, having found no room at any
upstream, waits queued again (``defer``); a cancel (``cancel``,
``cancel_batch_jobs``) or the sweeper (``requeue_expired``) may take it from the
attempt first, and so may its deadline (``end_overdue``); a finished job may be
deleted (``mark_deleted``, ``mark_batch_jobs_deleted``: a tombstone); the outbox's
marks (``mark_published``, ``mark_unpublished``) say whether its message reached
the broker.

Each move is one UPDATE whose WHERE names the statuses ``TRANSITIONS`` lets it
come from (``moves_to``), so racing workers, sweepers and cancels cannot both
win: the loser's UPDATE matches no row, and it is told so (``False``,
``Outcome.discarded``). A write by an attempt is guarded by its lease token too.
Functions take the caller's session and only execute: the caller's unit of work
commits. Nothing else writes the job table (tests/unit/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any, cast

import sqlalchemy as sa
from sqlmodel import Session

from shared.core.columns import table
from shared.jobs.models import (
    FINISHED,
    LEASED,
    START,
    WAITING,
    Image,
    Job,
    JobStatus,
    moves_to,
)


class Outcome(StrEnum):
    """How running a job ended for the worker (its task's result, logs, metrics)."""

    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    # The attempt ran but its end was not recorded: the job was canceled or taken
    # over by another attempt meanwhile.
    discarded = "discarded"
    # Nothing ran: the job could not be claimed (finished, or held by a live attempt).
    skipped = "skipped"
    # Nothing was called: every deployment was at its limit; the job is queued again
    # to come back when there is room (``defer``).
    deferred = "deferred"


_JOBS = table(Job)
_INSERT_JOBS = sa.insert(_JOBS)
_INSERT_IMAGES = sa.insert(table(Image))


def _status_in(statuses: Sequence[JobStatus]) -> sa.ColumnElement[bool]:
    """``status = x`` for one status (the SQL the hand-written guards always had),
    ``status IN (...)`` for several."""
    if len(statuses) == 1:
        return _JOBS.c.status == statuses[0]
    return _JOBS.c.status.in_(statuses)


def _taken_from(target: JobStatus) -> sa.ColumnElement[bool]:
    """The guard of a move to ``target`` by someone other than the job's attempt (a
    claim, the sweeper): from any of its sources, but from one held by an attempt
    (``LEASED``) only once that attempt's lease expired (its worker died)."""
    return sa.or_(
        *(
            sa.and_(_JOBS.c.status == status, _JOBS.c.lease_expires_at < sa.bindparam("now"))
            if status in LEASED
            else _JOBS.c.status == status
            for status in moves_to(target)
        )
    )


def _held_by(token: str = "token") -> sa.ColumnElement[bool]:
    """The guard of an attempt's own write: the job is still its attempt's."""
    return sa.and_(_status_in(LEASED), _JOBS.c.lease_token == sa.bindparam(token))


def _rowcount(result: sa.Result[Any]) -> int:
    # An UPDATE's result is a CursorResult, which counts the rows it matched.
    return cast(sa.CursorResult[Any], result).rowcount


# --- create ---------------------------------------------------------------------------


def create(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Record new jobs, each ``queued``: plain rows (a ``Job``'s ``model_dump()``, or
    the batch pump's rows made from one template) in one executemany INSERT, none of
    the ORM's flush work on the API's hot path."""
    for row in rows:
        if row["status"] != START:
            raise ValueError(f"a job starts {START}, not {row['status']}")
    if rows:
        session.execute(_INSERT_JOBS, list(rows))


# --- an attempt: claim, hold, end -----------------------------------------------------

# Built once: a statement made per call costs its construction and its cache key
# again each time (measured: 2.1 ms of CPU per claim through the ORM's UPDATE, 0.75
# ms for this prebuilt Core statement, most of the rest being the round trips).
_CLAIM = (
    sa.update(_JOBS)
    .where(_JOBS.c.id.in_(sa.bindparam("ids", expanding=True)))
    .where(_taken_from(JobStatus.running))
    # Past its deadline (Cancel-After) a job is never taken, so never sent upstream:
    # ``end_overdue`` ends it instead (the claim's caller, the sweeper).
    .where(sa.or_(_JOBS.c.deadline_at.is_(None), _JOBS.c.deadline_at > sa.bindparam("now")))
    .values(
        status=JobStatus.running,
        attempts=_JOBS.c.attempts + 1,
        lease_token=sa.bindparam("token"),
        lease_expires_at=sa.bindparam("expires"),
        started_at=sa.func.coalesce(_JOBS.c.started_at, sa.bindparam("now")),
        # A new attempt starts its steps again, unless they are a queue provider's
        # job still out there (issue 27): it goes on, and shows where it was until
        # the attempt's look says more.
        progress=sa.case((_JOBS.c.upstream_open, _JOBS.c.progress), else_=sa.null()),
        status_detail=None,
    )
    .returning(*_JOBS.c)
)


def claim(
    session: Session, job_ids: Sequence[str], token: str, now: datetime, expires: datetime
) -> list[Job]:
    """Take the jobs for one attempt holding ``token`` until ``expires``: queued ones,
    and running ones whose lease expired. Those finished or held by a live attempt
    are left out. Returns the jobs taken, as their rows now are."""
    # One statement: the guarded UPDATE hands back the rows it took.
    rows = session.execute(
        _CLAIM, {"ids": list(job_ids), "now": now, "token": token, "expires": expires}
    )
    return [Job(**row._mapping) for row in rows]


_HELD = sa.and_(
    _JOBS.c.id.in_(sa.bindparam("ids", expanding=True)),
    _JOBS.c.lease_token.in_(sa.bindparam("tokens", expanding=True)),
    _status_in(LEASED),
)
_RENEW = sa.update(_JOBS).where(_HELD).values(lease_expires_at=sa.bindparam("expires"))
_STILL_HELD = sa.select(_JOBS.c.id).where(_HELD)


def renew(session: Session, held: Mapping[str, str], expires: datetime) -> set[str]:
    """The lease heartbeat: extend to ``expires`` the leases of the jobs ``held`` (job
    id -> lease token) that are still their attempts'; returns those ids (the rest
    were canceled or taken over)."""
    if not held:
        return set()
    params = {"ids": list(held), "tokens": list(held.values())}
    session.execute(_RENEW, {**params, "expires": expires})
    return set(session.execute(_STILL_HELD, params).scalars())


_PROGRESS = (
    sa.update(_JOBS)
    .where(_JOBS.c.id == sa.bindparam("_id"), _held_by())
    .values(progress=sa.bindparam("progress"))
)


def note_progress(session: Session, job_id: str, token: str, progress: Mapping[str, int]) -> bool:
    """Record a running job's progress (``{"step": s, "steps": t}``); False when the
    job is no longer the attempt's holding ``token`` (canceled, taken over)."""
    result = session.execute(_PROGRESS, {"_id": job_id, "token": token, "progress": progress})
    return _rowcount(result) > 0


_DETAIL = (
    sa.update(_JOBS)
    .where(_JOBS.c.id == sa.bindparam("_id"), _held_by())
    .values(status_detail=sa.bindparam("detail"))
)


def set_detail(session: Session, job_id: str, token: str, detail: str | None) -> bool:
    """Say what the running job waits on (None: nothing any more); False when the job
    is no longer the attempt's holding ``token``."""
    result = session.execute(_DETAIL, {"_id": job_id, "token": token, "detail": detail})
    return _rowcount(result) > 0


@lru_cache
def _end_statement(target: JobStatus, columns: tuple[str, ...]) -> sa.Update:
    """The guarded UPDATE that ends one job's attempt in ``target``, setting
    ``columns``: a Core statement (the table, not the model: no ORM bookkeeping per
    job), built once per target and set of columns (a statement built per call costs
    its construction and its cache key again; measured about a third of recording a
    job)."""
    return (
        sa.update(_JOBS)
        .where(
            _JOBS.c.id == sa.bindparam("_id"),
            _status_in(moves_to(target)),
            _JOBS.c.lease_token == sa.bindparam("_token"),
        )
        .values(
            status=target,
            finished_at=sa.bindparam("_now"),
            lease_token=None,
            lease_expires_at=None,
            **{name: sa.bindparam(name) for name in columns},
        )
    )


def _end(
    session: Session, job: Job, token: str, now: datetime, target: JobStatus, **values: Any
) -> bool:
    """End ``job``'s attempt in ``target`` with ``values``; on success the in-memory
    job equals the row just written (no need to read it back)."""
    statement = _end_statement(target, tuple(sorted(values)))
    result = session.execute(statement, {**values, "_id": job.id, "_token": token, "_now": now})
    if _rowcount(result) != 1:
        return False  # canceled or taken over meanwhile
    job.status = target
    for name, value in values.items():
        setattr(job, name, value)
    job.finished_at, job.lease_token, job.lease_expires_at = now, None, None
    return True


def finish(
    session: Session,
    job: Job,
    token: str,
    now: datetime,
    *,
    images: Sequence[Image],
    usage: dict[str, Any] | None,
    progress: dict[str, int] | None = None,
    served_by: dict[str, str] | None = None,
    cost_usd: float | None = None,
) -> Outcome:
    """The attempt holding ``token`` succeeded: the job ends ``succeeded`` with its
    images (written in the same transaction, so a job ends with exactly ``n``), its
    usage and its last step. ``discarded`` when it is no longer the attempt's."""
    done = {"progress": progress} if progress is not None else {}
    ended = _end(
        session,
        job,
        token,
        now,
        JobStatus.succeeded,
        usage=usage,
        served_by=served_by,
        cost_usd=cost_usd,
        **done,
    )
    if not ended:
        return Outcome.discarded
    if images:
        session.execute(_INSERT_IMAGES, [image.model_dump() for image in images])
    return Outcome.succeeded


_FINISH_LINES = (
    sa.update(_JOBS)
    .where(
        _JOBS.c.id.in_(sa.bindparam("ids", expanding=True)),
        _status_in(moves_to(JobStatus.succeeded)),
        _JOBS.c.lease_token == sa.bindparam("token"),
    )
    .values(
        status=JobStatus.succeeded,
        finished_at=sa.bindparam("now"),
        lease_token=None,
        lease_expires_at=None,
        served_by=sa.bindparam("served_by", type_=sa.JSON),
        cost_usd=sa.bindparam("cost_usd"),
    )
    .returning(_JOBS.c.id)
)


def finish_lines(
    session: Session,
    lines: Sequence[tuple[Job, Sequence[Image]]],
    token: str,
    now: datetime,
    served_by: dict[str, str] | None = None,
    cost_usd: float | None = None,
) -> set[str]:
    """``finish`` for many succeeded batch lines served alike (no usage, no
    progress; one ``served_by`` and one ``cost_usd``) at once: one statement for the
    jobs and one for their images. Returns the ids that ended
    ``succeeded``; the others are no longer the attempt's (discarded). The in-memory
    jobs are left as they were."""
    if not lines:
        return set()
    ids = [job.id for job, _ in lines]
    values = {"ids": ids, "token": token, "now": now, "served_by": served_by, "cost_usd": cost_usd}
    done = set(session.execute(_FINISH_LINES, values).scalars())
    rows = [image.model_dump() for job, images in lines if job.id in done for image in images]
    if rows:
        session.execute(_INSERT_IMAGES, rows)
    return done


def fail(
    session: Session,
    job: Job,
    token: str,
    now: datetime,
    *,
    error_code: str,
    error_message: str,
    attempts: int | None = None,
) -> Outcome:
    """The attempt holding ``token`` failed: the job ends ``failed`` with its error
    (``attempts``: corrected, when the claim that ended it ran nothing).
    ``discarded`` when it is no longer the attempt's."""
    extra = {"attempts": attempts} if attempts is not None else {}
    moved = _end(
        session,
        job,
        token,
        now,
        JobStatus.failed,
        error_code=error_code,
        error_message=error_message,
        **extra,
    )
    return Outcome.failed if moved else Outcome.discarded


_UPSTREAM = (
    sa.update(_JOBS)
    .where(_JOBS.c.id == sa.bindparam("_id"), _held_by())
    .values(upstream=sa.bindparam("upstream"), upstream_open=sa.bindparam("open"))
)


def note_upstream(session: Session, job_id: str, token: str, upstream: Mapping[str, Any]) -> bool:
    """Record the queue provider's jobs the attempt holding ``token`` submitted
    (issue 27); False when the job is no longer the attempt's."""
    open_ = any(isinstance(entry, Mapping) and "ref" in entry for entry in upstream.values())
    params = {"_id": job_id, "token": token, "upstream": dict(upstream), "open": open_}
    return _rowcount(session.execute(_UPSTREAM, params)) == 1


_CLOSE_UPSTREAM = (
    sa.update(_JOBS)
    .where(_JOBS.c.id == sa.bindparam("_id"), _JOBS.c.status == JobStatus.canceled)
    .values(upstream_open=False)
)


def close_upstream(session: Session, job_id: str) -> bool:
    """A canceled job's upstream jobs were canceled there: nothing left open."""
    return _rowcount(session.execute(_CLOSE_UPSTREAM, {"_id": job_id})) == 1


_DEFER = (
    sa.update(_JOBS)
    .where(_JOBS.c.id == sa.bindparam("_id"), _held_by())
    .values(
        status=JobStatus.queued,
        attempts=_JOBS.c.attempts - 1,
        lease_token=None,
        lease_expires_at=None,
        status_detail=sa.bindparam("detail"),
        published_at=sa.bindparam("due"),
    )
)


def defer(session: Session, job: Job, token: str, detail: str, due: datetime) -> Outcome:
    """The attempt holding ``token`` found no room at any deployment (issue 26) and
    called nothing: the job is queued again, its attempt not counted, saying why
    (``status_detail``), its message due at ``due`` (published with that countdown
    after commit; the sweeper leaves it until then). ``discarded`` when it is no
    longer the attempt's."""
    params = {"_id": job.id, "token": token, "detail": detail[:500], "due": due}
    if _rowcount(session.execute(_DEFER, params)) != 1:
        return Outcome.discarded
    return Outcome.deferred


# --- taken from an attempt: the sweeper, a cancel --------------------------------------

_REQUEUE = (
    sa.update(_JOBS)
    .where(_taken_from(JobStatus.queued))
    .values(
        status=JobStatus.queued,
        lease_token=None,
        lease_expires_at=None,
        published_at=None,
        status_detail=None,  # what the dead attempt waited on no longer holds
    )
)


def requeue_expired(session: Session, now: datetime) -> int:
    """Jobs whose attempt's lease expired before ``now`` (its worker died) are queued
    again, unpublished (the sweeper publishes them); returns how many."""
    return _rowcount(session.execute(_REQUEUE, {"now": now}))


_CANCEL = (
    sa.update(_JOBS)
    .where(_JOBS.c.id == sa.bindparam("_id"), _status_in(moves_to(JobStatus.canceled)))
    .values(
        status=JobStatus.canceled,
        canceled_at=sa.bindparam("now"),
        finished_at=sa.bindparam("now"),
        lease_token=None,
        lease_expires_at=None,
    )
)


def cancel(session: Session, job_id: str, now: datetime) -> bool:
    """Queued: it never runs. Running: it ends canceled now and its attempt's end is
    discarded (its lease is gone). False when it had already finished."""
    return _rowcount(session.execute(_CANCEL, {"_id": job_id, "now": now})) == 1


_CANCEL_BATCH_JOBS = (
    sa.update(_JOBS)
    .where(_JOBS.c.batch_id == sa.bindparam("_batch_id"), _status_in(WAITING))
    .values(
        status=JobStatus.canceled, canceled_at=sa.bindparam("now"), finished_at=sa.bindparam("now")
    )
    .returning(_JOBS.c.batch_item_id)
)


def cancel_batch_jobs(session: Session, batch_id: str, now: datetime) -> list[str]:
    """A stopped batch's jobs that wait for a worker end canceled (running ones end on
    their own); returns their lines' ids."""
    return [
        item_id
        for item_id in session.execute(
            _CANCEL_BATCH_JOBS, {"_batch_id": batch_id, "now": now}
        ).scalars()
        if item_id is not None
    ]


# --- deadlines and deletion (issue 29) ---------------------------------------------

DEADLINE_MESSAGE = "The job did not finish by its deadline (Cancel-After) and was canceled."

_OVERDUE = sa.and_(
    _JOBS.c.deadline_at.is_not(None),
    _JOBS.c.deadline_at <= sa.bindparam("now"),
    _status_in(moves_to(JobStatus.canceled)),
)
_END_OVERDUE_VALUES: dict[str, Any] = {
    "status": JobStatus.canceled,
    "canceled_at": sa.bindparam("now"),
    "finished_at": sa.bindparam("now"),
    "lease_token": None,
    "lease_expires_at": None,
    "status_detail": None,
    "error_code": "deadline_exceeded",  # ErrorCode.deadline_exceeded (core imports no domain)
    "error_message": DEADLINE_MESSAGE,
}
_END_OVERDUE_OF = (
    sa.update(_JOBS)
    .where(_JOBS.c.id.in_(sa.bindparam("ids", expanding=True)), _OVERDUE)
    .values(**_END_OVERDUE_VALUES)
    .returning(*_JOBS.c)
)
_END_OVERDUE_ANY = (
    sa.update(_JOBS)
    .where(
        _JOBS.c.id.in_(
            sa.select(_JOBS.c.id).where(_OVERDUE).limit(sa.bindparam("limit")).scalar_subquery()
        ),
        _OVERDUE,  # again: a row another sweeper ended meanwhile is not ended twice
    )
    .values(**_END_OVERDUE_VALUES)
    .returning(*_JOBS.c)
)


def end_overdue(
    session: Session, now: datetime, ids: Sequence[str] | None = None, limit: int = 500
) -> list[Job]:
    """Jobs past their deadline that have not finished end ``canceled`` with
    ``deadline_exceeded``: queued ones never run (the claim refuses them), a running
    one's attempt loses its lease (its heartbeat notices; its end is discarded).
    Among ``ids`` (a claim's, a heartbeat's), else any (the sweeper; at most
    ``limit``). Returns the jobs ended, as their rows now are: the caller releases
    what they held (shared/jobs/service.py:overdue_ended)."""
    if ids is not None:
        if not ids:
            return []
        rows = session.execute(_END_OVERDUE_OF, {"ids": list(ids), "now": now})
    else:
        rows = session.execute(_END_OVERDUE_ANY, {"now": now, "limit": limit})
    return [Job(**row._mapping) for row in rows]


# A deleted job is a tombstone of a finished one: every move above is guarded by
# statuses a finished job is not in, so none of them can touch it again (a late
# worker's ``finish`` is discarded, its images never recorded).
_DELETE = (
    sa.update(_JOBS)
    .where(
        _JOBS.c.id == sa.bindparam("_id"),
        _JOBS.c.deleted_at.is_(None),
        _status_in(FINISHED),
    )
    .values(deleted_at=sa.bindparam("now"))
)


def mark_deleted(session: Session, job_id: str, now: datetime) -> bool:
    """The finished job becomes a tombstone (read as absent); False when it is not
    finished or was deleted already."""
    return _rowcount(session.execute(_DELETE, {"_id": job_id, "now": now})) == 1


_DELETE_BATCH_JOBS = (
    sa.update(_JOBS)
    .where(
        _JOBS.c.batch_id == sa.bindparam("_batch_id"),
        _JOBS.c.deleted_at.is_(None),
        _status_in(FINISHED),
    )
    .values(deleted_at=sa.bindparam("now"))
    .returning(_JOBS.c.id)
)


def mark_batch_jobs_deleted(session: Session, batch_id: str, now: datetime) -> list[str]:
    """A deleted batch's finished jobs become tombstones; returns their ids."""
    return list(session.execute(_DELETE_BATCH_JOBS, {"_batch_id": batch_id, "now": now}).scalars())


# --- retention (issue 29) ----------------------------------------------------------------

_REMOVE_FINISHED = sa.delete(_JOBS).where(
    _JOBS.c.id.in_(sa.bindparam("ids", expanding=True)), _status_in(FINISHED)
)


_INPUTS_REMOVED = (
    sa.update(_JOBS)
    .where(
        _JOBS.c.id.in_(sa.bindparam("ids", expanding=True)),
        _JOBS.c.input_bytes > 0,
        _status_in(FINISHED),
    )
    .values(input_bytes=0)
)


def inputs_removed(session: Session, job_ids: Sequence[str]) -> int:
    """The purge deleted these finished jobs' stored inputs (an edit's images and
    mask): they store 0 bytes from now on (the project's storage_bytes drops) and
    the purge does not take them again. Returns the rows marked."""
    if not job_ids:
        return 0
    return _rowcount(session.execute(_INPUTS_REMOVED, {"ids": list(job_ids)}))


def remove_finished(session: Session, job_ids: Sequence[str]) -> int:
    """The purge (shared/retention/purge.py) removes finished jobs past their
    project's job retention, its children's rows gone first; a job that is not
    finished is never removed. Returns the rows removed."""
    if not job_ids:
        return 0
    return _rowcount(session.execute(_REMOVE_FINISHED, {"ids": list(job_ids)}))


# --- the outbox's marks ------------------------------------------------------------------

_PUBLISHED = (
    sa.update(_JOBS)
    .where(_JOBS.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(published_at=sa.bindparam("now"))
)


def mark_published(session: Session, job_ids: Sequence[str], now: datetime) -> None:
    """The jobs' messages were handed to the broker at ``now``. Unguarded: the mark
    only matters while a job waits, and a job that moved on meanwhile is not harmed."""
    if job_ids:
        session.execute(_PUBLISHED, {"ids": list(job_ids), "now": now})


_UNPUBLISHED = (
    sa.update(_JOBS)
    .where(_JOBS.c.id == sa.bindparam("_id"), _status_in(WAITING))
    .values(published_at=None)
)


def mark_unpublished(session: Session, job_id: str) -> None:
    """The broker refused the message: leave the waiting job for the sweeper to publish."""
    session.execute(_UNPUBLISHED, {"_id": job_id})
