"""The deadline's and deletion's guarded moves (issue 29) on PostgreSQL, as
several workers and sweepers run them at once: two sweepers ending overdue jobs
end each exactly once; the claim refuses an overdue job; a deleted job is out of
every move's reach, a late attempt's finish included."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from uuid import uuid4

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col

from shared.core.clock import utcnow
from shared.jobs import lifecycle
from shared.jobs.lifecycle import Outcome
from shared.jobs.models import Job, JobStatus
from shared.projects.models import Project
from tests.support.processes import create_database, drop_database


@pytest.fixture(scope="module")
def engine() -> Iterator[sa.Engine]:
    url = create_database()
    engine = sa.create_engine(url, pool_size=4)
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()
    drop_database(url)


def _jobs(engine: sa.Engine, count: int, deadline_in: float) -> list[str]:
    now = utcnow()
    with Session(engine) as session, session.begin():
        project = Project(name=f"p-{uuid4().hex[:8]}")
        session.add(project)
        session.flush()
        rows = [
            Job(
                project_id=project.id,
                model="procedural",
                request={"prompt": "p"},
                deadline_at=now + timedelta(seconds=deadline_in),
            ).model_dump()
            for _ in range(count)
        ]
        lifecycle.create(session, rows)
    return [row["id"] for row in rows]


def test_two_sweepers_end_each_overdue_job_once(engine: sa.Engine) -> None:
    ids = set(_jobs(engine, 120, deadline_in=-1))
    _jobs(engine, 5, deadline_in=3600)  # in time: left alone
    ended: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def sweep(slot: int) -> None:
        start.wait()
        while True:
            with Session(engine) as session, session.begin():
                jobs = lifecycle.end_overdue(session, utcnow(), limit=20)
            if not jobs:
                return
            ended[slot] += [job.id for job in jobs]

    threads = [threading.Thread(target=sweep, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    both = ended[0] + ended[1]
    assert len(both) == len(set(both))  # none ended twice
    assert ids <= set(both)
    with Session(engine) as session:
        rows = session.execute(
            sa.select(col(Job.status), col(Job.error_code)).where(col(Job.id).in_(ids))
        ).all()
    assert set(rows) == {(JobStatus.canceled, "deadline_exceeded")}


def test_the_claim_refuses_an_overdue_job_and_a_heartbeat_ends_a_running_one(
    engine: sa.Engine,
) -> None:
    overdue, running = _jobs(engine, 1, -1) + _jobs(engine, 1, 60)
    now = utcnow()
    with Session(engine) as session, session.begin():
        assert lifecycle.claim(session, [overdue], "t1", now, now + timedelta(minutes=1)) == []
        [job] = lifecycle.claim(session, [running], "t2", now, now + timedelta(minutes=1))
    later = now + timedelta(seconds=61)
    with Session(engine) as session, session.begin():
        ended = lifecycle.end_overdue(session, later, [overdue, running])
        assert {j.id for j in ended} == {overdue, running}
        assert lifecycle.renew(session, {running: "t2"}, later) == set()  # its lease is lost
        # The late attempt's end is refused: the job stays as its deadline left it.
        assert lifecycle.finish(session, job, "t2", later, images=[], usage=None) == (
            Outcome.discarded
        )


def test_a_deleted_job_is_out_of_every_moves_reach(engine: sa.Engine) -> None:
    [job_id] = _jobs(engine, 1, 3600)
    now = utcnow()
    with Session(engine) as session, session.begin():
        assert not lifecycle.mark_deleted(session, job_id, now)  # not finished: refused
        [job] = lifecycle.claim(session, [job_id], "t", now, now + timedelta(minutes=1))
        assert lifecycle.cancel(session, job_id, now)
        assert lifecycle.mark_deleted(session, job_id, now)
        assert not lifecycle.mark_deleted(session, job_id, now)  # once
        assert lifecycle.claim(session, [job_id], "u", now, now + timedelta(minutes=1)) == []
        assert not lifecycle.cancel(session, job_id, now)
        assert (
            lifecycle.fail(session, job, "t", now, error_code="x", error_message="late")
            == Outcome.discarded
        )
        assert lifecycle.end_overdue(session, now + timedelta(days=1), [job_id]) == []
        row = session.get(Job, job_id)
        assert row is not None
        assert (row.status, row.deleted_at is not None, row.error_code) == (
            JobStatus.canceled,
            True,
            None,
        )
