"""Each move of a job (shared/jobs/lifecycle.py) on a real database (SQLite, a
temporary file) with no processes: the statuses TRANSITIONS allows it from move, the
others are left as they were."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, select

import shared.models  # noqa: F401  every table, for create_all
from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.db import make_engine
from shared.jobs import lifecycle
from shared.jobs.lifecycle import Outcome
from shared.jobs.models import (
    CANCELABLE,
    FINISHED,
    LEASED,
    START,
    TRANSITIONS,
    WAITING,
    Image,
    Job,
    JobStatus,
    moves_to,
)
from shared.projects.models import Project

NOW = utcnow()
TOKEN = "token-a"
ALL = list(JobStatus)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    """The project's engine for SQLite (WAL, foreign keys) on a temporary file."""
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('lifecycle') / 'jobs.sqlite'}")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Project(id="proj_1", name="one"))
        session.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: sa.Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        session.execute(sa.delete(Image))
        session.execute(sa.delete(Job))
        session.commit()
        yield session


def put(
    session: Session,
    status: JobStatus,
    *,
    expired: bool = False,
    token: str | None = TOKEN,
    **fields: Any,
) -> Job:
    """A job in ``status`` as the moves leave one: a running job holds a lease
    (expired or not), a finished one none."""
    held = status in LEASED
    values: dict[str, Any] = {
        "project_id": "proj_1",
        "model": "m",
        "request": {},
        "status": status,
        "attempts": 1 if held else 0,
        "lease_token": token if held else None,
        "lease_expires_at": (NOW + timedelta(seconds=-5 if expired else 60)) if held else None,
        "started_at": NOW - timedelta(seconds=10) if status != JobStatus.queued else None,
        "finished_at": NOW - timedelta(seconds=1) if status in FINISHED else None,
        "published_at": NOW - timedelta(seconds=20),
    }
    job = Job(**(values | fields))
    session.add(job)
    session.commit()
    return job


def row(session: Session, job_id: str) -> sa.Row[Any]:
    """The job's row as the database has it now (not the session's copy)."""
    return session.execute(sa.select(table(Job)).where(col(Job.id) == job_id)).one()


def unchanged(session: Session, job: Job, before: sa.Row[Any]) -> bool:
    return row(session, job.id) == before


# --- the table ---------------------------------------------------------------------------


def test_the_sources_of_each_move_come_from_transitions() -> None:
    assert moves_to(JobStatus.running) == (JobStatus.queued, JobStatus.running)
    assert moves_to(JobStatus.queued) == (JobStatus.running,)
    assert moves_to(JobStatus.succeeded) == moves_to(JobStatus.failed) == (JobStatus.running,)
    assert CANCELABLE == moves_to(JobStatus.canceled) == (JobStatus.queued, JobStatus.running)
    assert (JobStatus.running,) == LEASED
    assert (JobStatus.queued,) == WAITING
    assert set(WAITING) <= set(CANCELABLE)
    assert JobStatus.queued == START
    assert all(not TRANSITIONS[status] for status in FINISHED)


def test_the_status_column_reads_back_as_a_job_status(session: Session) -> None:
    job = put(session, JobStatus.running)
    assert type(row(session, job.id).status) is JobStatus
    session.expire_all()
    read = session.exec(select(Job).where(col(Job.id) == job.id)).one()
    assert read.status is JobStatus.running


# --- create ------------------------------------------------------------------------------


def test_create_records_jobs_queued_and_refuses_any_other_start(session: Session) -> None:
    jobs = [Job(project_id="proj_1", model="m", request={"n": i}) for i in range(3)]
    lifecycle.create(session, [job.model_dump() for job in jobs])
    session.commit()
    assert [row(session, job.id).status for job in jobs] == [JobStatus.queued] * 3
    lifecycle.create(session, [])  # nothing to record: no statement
    for status in ALL:
        if status == START:
            continue
        late = Job(project_id="proj_1", model="m", request={}, status=status)
        with pytest.raises(ValueError, match="a job starts queued"):
            lifecycle.create(session, [late.model_dump()])


# --- claim -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ALL)
@pytest.mark.parametrize("expired", [False, True])
def test_claim_takes_queued_jobs_and_running_ones_whose_lease_expired(
    session: Session, status: JobStatus, expired: bool
) -> None:
    job = put(session, status, expired=expired)
    before = row(session, job.id)
    expires = NOW + timedelta(seconds=30)
    taken = lifecycle.claim(session, [job.id], "token-b", NOW, expires)
    session.commit()
    movable = status == JobStatus.queued or (status == JobStatus.running and expired)
    if not movable:
        assert taken == []
        assert unchanged(session, job, before)
        return
    assert [t.id for t in taken] == [job.id]
    (claimed,) = taken
    assert claimed.status is JobStatus.running
    assert claimed.lease_token == "token-b"
    assert claimed.lease_expires_at == expires
    assert claimed.attempts == before.attempts + 1
    # started once: a re-run keeps its first start; a new attempt starts its steps again
    assert claimed.started_at == (before.started_at or NOW)
    assert claimed.progress is None
    assert claimed.status_detail is None
    assert row(session, job.id).lease_token == "token-b"


def test_claim_keeps_the_steps_of_a_queue_providers_job_still_out(session: Session) -> None:
    steps = {"step": 7, "steps": 20}
    out = put(session, JobStatus.queued, progress=steps, upstream_open=True)
    local = put(session, JobStatus.queued, progress=steps)
    taken = lifecycle.claim(session, [out.id, local.id], "token-b", NOW, NOW)
    session.commit()
    progress = {job.id: job.progress for job in taken}
    # its upstream job goes on there: shown where it was; a local model starts again
    assert progress == {out.id: steps, local.id: None}
    assert row(session, out.id).progress == steps


def test_claim_takes_what_it_can_of_many(session: Session) -> None:
    queued, live, done = (
        put(session, JobStatus.queued),
        put(session, JobStatus.running),
        put(session, JobStatus.succeeded),
    )
    taken = lifecycle.claim(session, [queued.id, live.id, done.id, "job_missing"], "t2", NOW, NOW)
    assert [t.id for t in taken] == [queued.id]


# --- an attempt's own writes: renew, progress, detail --------------------------------------


@pytest.mark.parametrize("status", ALL)
def test_renew_extends_the_lease_of_jobs_still_held(session: Session, status: JobStatus) -> None:
    job = put(session, status)
    other = put(session, JobStatus.running, token="token-other")
    before = row(session, other.id)
    expires = NOW + timedelta(minutes=5)
    still = lifecycle.renew(session, {job.id: TOKEN, other.id: "token-mine-no-more"}, expires)
    session.commit()
    if status in LEASED:
        assert still == {job.id}
        assert row(session, job.id).lease_expires_at == expires
    else:
        assert still == set()
    assert unchanged(session, other, before)  # taken over by another attempt
    assert lifecycle.renew(session, {}, expires) == set()


@pytest.mark.parametrize("status", ALL)
def test_progress_is_noted_only_while_the_attempt_holds_the_job(
    session: Session, status: JobStatus
) -> None:
    job = put(session, status)
    before = row(session, job.id)
    assert not lifecycle.note_progress(session, job.id, "token-b", {"step": 1, "steps": 4})
    moved = lifecycle.note_progress(session, job.id, TOKEN, {"step": 2, "steps": 4})
    session.commit()
    assert moved is (status in LEASED)
    if moved:
        assert row(session, job.id).progress == {"step": 2, "steps": 4}
    else:
        assert unchanged(session, job, before)


@pytest.mark.parametrize("status", ALL)
def test_a_detail_is_set_only_while_the_attempt_holds_the_job(
    session: Session, status: JobStatus
) -> None:
    job = put(session, status)
    before = row(session, job.id)
    assert not lifecycle.set_detail(session, job.id, "token-b", "not mine")
    moved = lifecycle.set_detail(session, job.id, TOKEN, "waiting for storage")
    session.commit()
    assert moved is (status in LEASED)
    if moved:
        assert row(session, job.id).status_detail == "waiting for storage"
        assert lifecycle.set_detail(session, job.id, TOKEN, None)
        session.commit()
        assert row(session, job.id).status_detail is None
    else:
        assert unchanged(session, job, before)


# --- an attempt's end: finish, finish_lines, fail ------------------------------------------


def image(job: Job, index: int) -> Image:
    return Image(
        project_id=job.project_id,
        job_id=job.id,
        index=index,
        storage_key=f"k/{job.id}/{index}",
        content_type="image/png",
        width=1,
        height=1,
        size_bytes=1,
    )


def images_of(session: Session, job: Job) -> int:
    return len(session.exec(select(Image).where(col(Image.job_id) == job.id)).all())


@pytest.mark.parametrize("status", ALL)
def test_finish_ends_a_held_job_succeeded_with_its_images(
    session: Session, status: JobStatus
) -> None:
    job = put(session, status)
    before = row(session, job.id)
    usage = {"total_tokens": 3}
    ended = lifecycle.finish(
        session, job, TOKEN, NOW, images=[image(job, 0), image(job, 1)], usage=usage
    )
    session.commit()
    if status not in moves_to(JobStatus.succeeded):
        # e.g. finishing a canceled job: nothing written, reported discarded
        assert ended is Outcome.discarded
        assert unchanged(session, job, before)
        assert images_of(session, job) == 0
        assert job.status == status  # the in-memory job is left as it was
        return
    assert ended is Outcome.succeeded
    now = row(session, job.id)
    assert now.status == JobStatus.succeeded
    assert now.usage == usage
    assert now.finished_at == NOW
    assert now.lease_token is None
    assert now.lease_expires_at is None
    assert images_of(session, job) == 2
    # the in-memory job equals the row just written
    assert (job.status, job.usage, job.finished_at, job.lease_token) == (
        JobStatus.succeeded,
        usage,
        NOW,
        None,
    )


def test_finish_is_discarded_once_the_lease_is_someone_elses(session: Session) -> None:
    job = put(session, JobStatus.running, token="token-b")
    ended = lifecycle.finish(session, job, TOKEN, NOW, images=[image(job, 0)], usage=None)
    assert ended is Outcome.discarded
    assert row(session, job.id).status == JobStatus.running
    assert images_of(session, job) == 0


def test_finish_keeps_the_last_step_when_given(session: Session) -> None:
    job = put(session, JobStatus.running, progress={"step": 3, "steps": 4})
    assert lifecycle.finish(session, job, TOKEN, NOW, images=[], usage=None) is Outcome.succeeded
    assert row(session, job.id).progress == {"step": 3, "steps": 4}  # untouched
    other = put(session, JobStatus.running)
    lifecycle.finish(session, other, TOKEN, NOW, images=[], usage=None, progress={"step": 4})
    assert row(session, other.id).progress == {"step": 4}


def test_finish_lines_ends_the_held_lines_and_discards_the_rest(session: Session) -> None:
    by_status = {status: put(session, status, batch_id="batch_1") for status in ALL}
    taken = put(session, JobStatus.running, token="token-b", batch_id="batch_1")
    lines = [(job, [image(job, 0)]) for job in [*by_status.values(), taken]]
    done = lifecycle.finish_lines(session, lines, TOKEN, NOW)
    session.commit()
    movable = {by_status[s].id for s in moves_to(JobStatus.succeeded)}
    assert done == movable
    for status, job in by_status.items():
        expected = JobStatus.succeeded if job.id in movable else status
        assert row(session, job.id).status == expected
        assert images_of(session, job) == (1 if job.id in movable else 0)
    assert row(session, taken.id).status == JobStatus.running
    assert lifecycle.finish_lines(session, [], TOKEN, NOW) == set()


@pytest.mark.parametrize("status", ALL)
def test_fail_ends_a_held_job_failed(session: Session, status: JobStatus) -> None:
    job = put(session, status)
    before = row(session, job.id)
    ended = lifecycle.fail(
        session, job, TOKEN, NOW, error_code="upstream_error", error_message="it broke"
    )
    session.commit()
    if status not in moves_to(JobStatus.failed):
        assert ended is Outcome.discarded
        assert unchanged(session, job, before)
        return
    assert ended is Outcome.failed
    now = row(session, job.id)
    assert (now.status, now.error_code, now.error_message) == (
        JobStatus.failed,
        "upstream_error",
        "it broke",
    )
    assert now.finished_at == NOW
    assert now.lease_token is None
    assert now.attempts == before.attempts
    assert job.status is JobStatus.failed
    assert job.error_code == "upstream_error"


def test_fail_may_correct_the_attempts(session: Session) -> None:
    job = put(session, JobStatus.running, attempts=4)
    ended = lifecycle.fail(
        session, job, TOKEN, NOW, error_code="max_attempts_exceeded", error_message="m", attempts=3
    )
    assert ended is Outcome.failed
    assert row(session, job.id).attempts == 3
    assert job.attempts == 3


@pytest.mark.parametrize("status", ALL)
def test_defer_queues_a_held_job_again_without_spending_its_attempt(
    session: Session, status: JobStatus
) -> None:
    job = put(session, status, attempts=2)
    before = row(session, job.id)
    due = NOW + timedelta(seconds=30)
    ended = lifecycle.defer(session, job, TOKEN, "waiting for capacity", due)
    session.commit()
    if status not in LEASED:
        assert ended is Outcome.discarded
        assert unchanged(session, job, before)
        return
    assert ended is Outcome.deferred
    now = row(session, job.id)
    assert (now.status, now.attempts, now.status_detail) == (
        JobStatus.queued,
        1,
        "waiting for capacity",
    )
    assert (now.lease_token, now.lease_expires_at, now.published_at) == (None, None, due)
    assert now.finished_at is None


def test_defer_is_discarded_once_the_lease_is_someone_elses(session: Session) -> None:
    job = put(session, JobStatus.running, token="another")
    before = row(session, job.id)
    assert lifecycle.defer(session, job, TOKEN, "w", NOW) is Outcome.discarded
    session.commit()
    assert unchanged(session, job, before)


# --- taken from an attempt: requeue, cancel ------------------------------------------------


@pytest.mark.parametrize("status", ALL)
@pytest.mark.parametrize("expired", [False, True])
def test_requeue_expired_queues_again_only_running_jobs_whose_lease_expired(
    session: Session, status: JobStatus, expired: bool
) -> None:
    job = put(session, status, expired=expired)
    before = row(session, job.id)
    count = lifecycle.requeue_expired(session, NOW)
    session.commit()
    if status in moves_to(JobStatus.queued) and expired:
        assert count == 1
        now = row(session, job.id)
        assert now.status == JobStatus.queued
        assert now.lease_token is None
        assert now.lease_expires_at is None
        assert now.published_at is None  # for the sweeper to publish
        assert now.attempts == before.attempts
    else:
        assert count == 0
        assert unchanged(session, job, before)


@pytest.mark.parametrize("status", ALL)
def test_cancel_moves_queued_and_running_jobs_only(session: Session, status: JobStatus) -> None:
    job = put(session, status)
    before = row(session, job.id)
    moved = lifecycle.cancel(session, job.id, NOW)
    session.commit()
    assert moved is (status in CANCELABLE)
    if moved:
        now = row(session, job.id)
        assert now.status == JobStatus.canceled
        assert now.canceled_at == NOW
        assert now.finished_at == NOW
        assert now.lease_token is None
        assert now.lease_expires_at is None
        # the attempt that held it can no longer end it
        assert lifecycle.finish(session, job, TOKEN, NOW, images=[], usage=None) == "discarded"
    else:
        assert unchanged(session, job, before)
    assert lifecycle.cancel(session, "job_missing", NOW) is False


def test_cancel_batch_jobs_cancels_the_batchs_waiting_jobs_only(session: Session) -> None:
    mine = {
        status: put(session, status, batch_id="batch_1", batch_item_id=f"item_{status}")
        for status in ALL
    }
    others = put(session, JobStatus.queued, batch_id="batch_2", batch_item_id="item_x")
    before = {job.id: row(session, job.id) for job in [*mine.values(), others]}
    items = lifecycle.cancel_batch_jobs(session, "batch_1", NOW)
    session.commit()
    assert items == [f"item_{s}" for s in WAITING]
    for status, job in mine.items():
        if status in WAITING:
            now = row(session, job.id)
            assert now.status == JobStatus.canceled
            assert now.canceled_at == NOW
            assert now.finished_at == NOW
        else:  # a running line ends on its own
            assert unchanged(session, job, before[job.id])
    assert unchanged(session, others, before[others.id])


# --- the outbox's marks ---------------------------------------------------------------------


def test_mark_published_stamps_the_jobs(session: Session) -> None:
    jobs = [put(session, JobStatus.queued), put(session, JobStatus.queued)]
    later = NOW + timedelta(seconds=1)
    lifecycle.mark_published(session, [jobs[0].id], later)
    lifecycle.mark_published(session, [], later)  # nothing published: no statement
    session.commit()
    published: list[datetime | None] = [row(session, j.id).published_at for j in jobs]
    assert published == [later, NOW - timedelta(seconds=20)]


@pytest.mark.parametrize("status", ALL)
def test_mark_unpublished_only_touches_a_waiting_job(session: Session, status: JobStatus) -> None:
    job = put(session, status)
    before = row(session, job.id)
    lifecycle.mark_unpublished(session, job.id)
    session.commit()
    if status in WAITING:
        assert row(session, job.id).published_at is None
    else:
        assert unchanged(session, job, before)


def test_outcomes_name_every_finished_status_and_the_three_non_ends() -> None:
    assert {o.value for o in Outcome} == {s.value for s in FINISHED} | {
        "discarded",
        "skipped",
        "deferred",
    }
