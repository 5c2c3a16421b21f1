"""A queue provider's job (issue 27, worker/upstream_jobs.py): submitted once and
recorded on our job's row before anything else, looked at until done (pending:
UpstreamPending, the job waits queued), resumed from the row by a later attempt
(a worker that died) without a second submit, dropped when it failed there, and
canceled upstream when our job is no longer the attempt's."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel

import shared.core.db
import shared.models  # every table, for create_all
from shared.core.clock import utcnow
from shared.core.db import make_engine
from shared.core.errors import (
    JobCanceled,
    PermanentProviderError,
    TransientProviderError,
    UpstreamPending,
)
from shared.jobs import lifecycle
from shared.jobs.models import Job, JobStatus
from shared.jobs.routing import Target
from shared.jobs.schemas import GenerationParams
from shared.projects.models import Project
from shared.providers.base import Call, GeneratedImage, Generation, Pending
from shared.registry import Capabilities, UpstreamModel
from worker import sweeper, upstream_jobs
from worker.leases import LEASES

TOKEN = "lease-1"
PARAMS = GenerationParams(model="queued", prompt="p", n=1, size="1024x1024")


class FakeQueue:
    """A queue provider: pending for ``polls`` looks, then done (or ``failing``)."""

    def __init__(self, polls: int = 2) -> None:
        self.polls, self.submits, self.looks, self.canceled = polls, 0, 0, []  # type: ignore[var-annotated]
        self.failing = False

    def submit(self, call: Call) -> dict[str, Any]:
        self.submits += 1
        return {"id": f"up-{self.submits}"}

    def poll(self, call: Call, ref: dict[str, Any]) -> Generation | Pending:
        self.looks += 1
        if self.failing:
            raise TransientProviderError("the upstream job failed")
        if self.looks <= self.polls:
            return Pending(after=1.5, status="processing")
        return Generation(images=[GeneratedImage(b"png")])

    def cancel(self, spec: Any, ref: dict[str, Any]) -> None:
        self.canceled.append(ref["id"])


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Project(id="proj_1", name="one"))
        session.commit()
    monkeypatch.setattr(shared.core.db, "get_engine", lambda: engine)
    yield engine
    engine.dispose()


@pytest.fixture
def queue(monkeypatch: pytest.MonkeyPatch) -> FakeQueue:
    fake = FakeQueue()
    monkeypatch.setattr(upstream_jobs, "get_provider", lambda spec: fake)
    return fake


def _running(engine: sa.Engine) -> Job:
    job = Job(
        project_id="proj_1",
        model="queued",
        request={},
        status=JobStatus.running,
        attempts=1,
        lease_token=TOKEN,
        lease_expires_at=utcnow() + timedelta(seconds=60),
    )
    with Session(engine, expire_on_commit=False) as session:
        session.add(job)
        session.commit()
    return job


def _row(engine: sa.Engine, job_id: str) -> Job:
    with Session(engine, expire_on_commit=False) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


# A queue kind's entry, built without the registry's check of built kinds.
SPEC = UpstreamModel.model_construct(
    name="queued",
    provider="replicate",
    capabilities=Capabilities(sizes=["1024x1024"]),
    deployments=[],
    fallbacks=[],
)
TARGET = Target(SPEC, PARAMS, "queued", "queued", cools=False)
CALL = Call(SPEC, PARAMS, 1)


def _attempt(job: Job) -> Generation:
    LEASES.hold(job.id, TOKEN)
    upstream_jobs.UPSTREAMS.hold(job)
    try:
        return upstream_jobs.call(CALL, TARGET, job.id)
    finally:
        upstream_jobs.UPSTREAMS.release(job.id)
        LEASES.release(job.id)


def test_a_job_is_submitted_once_recorded_and_resumed_from_its_row(
    engine: sa.Engine, queue: FakeQueue
) -> None:
    job = _running(engine)
    with pytest.raises(UpstreamPending) as first:
        _attempt(job)
    assert first.value.retry_after == 1.5
    assert "processing" in first.value.message
    recorded = _row(engine, job.id).upstream
    assert recorded is not None
    assert {k: v for k, v in recorded["0"].items() if k != "submitted_at"} == {
        "provider": "replicate",
        "model": "queued",
        "deployment": "queued",
        "ref": {"id": "up-1"},
        "submits": 1,
    }
    # A later attempt (another worker: the book is loaded from the row) looks again.
    with pytest.raises(UpstreamPending):
        _attempt(_row(engine, job.id))
    done = _attempt(_row(engine, job.id))
    assert [image.data for image in done.images] == [b"png"]
    assert queue.submits == 1  # never paid twice
    assert queue.looks == 3


def test_a_job_canceled_while_it_was_submitted_is_canceled_upstream(
    engine: sa.Engine, queue: FakeQueue
) -> None:
    job = _running(engine)
    with Session(engine) as session:  # canceled meanwhile: the lease is gone
        assert lifecycle.cancel(session, job.id, utcnow())
        session.commit()
    with pytest.raises(JobCanceled):
        _attempt(job)
    assert queue.canceled == ["up-1"]


def test_a_failed_look_is_tried_again_with_the_record_kept_then_submitted_anew(
    engine: sa.Engine, queue: FakeQueue
) -> None:
    """A look that fails for a reason that may pass (outputs not fetched, a job
    aborted there) keeps the record, looked at again after 2, 4, 8, 16, 32 s: a
    job done there is not paid twice. The sixth failure in a row forgets it, so a
    retry submits anew (the submits counted on)."""
    job = _running(engine)
    queue.failing = True
    for failures in range(1, upstream_jobs.LOOKS_IN_VAIN):
        with pytest.raises(UpstreamPending) as waiting:
            _attempt(_row(engine, job.id))
        assert "looking again" in waiting.value.message
        assert waiting.value.retry_after == 2.0**failures
        assert (_row(engine, job.id).upstream or {})["0"]["failures"] == failures
    with pytest.raises(TransientProviderError):
        _attempt(_row(engine, job.id))
    assert _row(engine, job.id).upstream == {"0": {"submits": 1}}
    assert queue.submits == 1
    queue.failing, queue.looks = False, 10
    assert _attempt(_row(engine, job.id)).images
    assert queue.submits == 2
    assert (_row(engine, job.id).upstream or {})["0"]["submits"] == 2


def test_a_call_is_submitted_at_most_the_provider_attempts(
    engine: sa.Engine, queue: FakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream job that fails there every time is not resubmitted forever."""

    class Settings:
        upstream_job_timeout_seconds = 1800.0
        provider_max_attempts = 2

    monkeypatch.setattr(upstream_jobs, "get_settings", Settings)
    monkeypatch.setattr(upstream_jobs, "LOOKS_IN_VAIN", 1)
    job = _running(engine)
    queue.failing = True
    with pytest.raises(TransientProviderError):
        _attempt(job)  # submit 1, failed there
    with pytest.raises(TransientProviderError):
        _attempt(_row(engine, job.id))  # submit 2, failed there
    with pytest.raises(PermanentProviderError):
        _attempt(_row(engine, job.id))
    assert queue.submits == 2


def test_a_glitch_in_a_look_does_not_pay_again(engine: sa.Engine, queue: FakeQueue) -> None:
    job = _running(engine)
    queue.failing = True
    with pytest.raises(UpstreamPending):
        _attempt(job)
    queue.failing, queue.looks = False, 10
    assert _attempt(_row(engine, job.id)).images
    assert queue.submits == 1


def test_a_record_at_another_target_is_canceled_there_and_submitted_anew(
    engine: sa.Engine, queue: FakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _running(engine)
    with pytest.raises(UpstreamPending):
        _attempt(job)

    class Registry:
        def get(self, name: str) -> UpstreamModel:
            return SPEC

    monkeypatch.setattr(upstream_jobs, "get_registry", Registry)
    elsewhere = Target(SPEC, PARAMS, "queued", "another-deployment", cools=True)
    LEASES.hold(job.id, TOKEN)
    upstream_jobs.UPSTREAMS.hold(_row(engine, job.id))
    try:
        with pytest.raises(UpstreamPending):
            upstream_jobs.call(CALL, elsewhere, job.id)
    finally:
        upstream_jobs.UPSTREAMS.release(job.id)
        LEASES.release(job.id)
    assert queue.canceled == ["up-1"]
    assert queue.submits == 2
    assert (_row(engine, job.id).upstream or {})["0"]["deployment"] == "another-deployment"


def test_the_cancel_task_cancels_every_recorded_upstream_job(
    engine: sa.Engine, queue: FakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _running(engine)
    with pytest.raises(UpstreamPending):
        _attempt(job)

    class Registry:
        def get(self, name: str) -> UpstreamModel:
            return SPEC

    monkeypatch.setattr(upstream_jobs, "get_registry", Registry)
    assert upstream_jobs.cancel(job.id) == 0  # a job a worker runs on is left alone
    with Session(engine) as session:
        assert lifecycle.cancel(session, job.id, utcnow())
        session.commit()
    assert upstream_jobs.cancel(job.id) == 1
    assert queue.canceled == ["up-1"]


def test_an_upstream_job_pending_past_the_provider_timeout_is_canceled_and_forgotten(
    engine: sa.Engine, queue: FakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Settings:
        upstream_job_timeout_seconds = 0.0
        provider_max_attempts = 4

    monkeypatch.setattr(upstream_jobs, "get_settings", Settings)
    job = _running(engine)
    with pytest.raises(TransientProviderError) as caught:
        _attempt(job)
    assert caught.value.code == "upstream_timeout"
    assert queue.canceled == ["up-1"]
    assert _row(engine, job.id).upstream == {"0": {"submits": 1}}


def test_a_fan_outs_calls_recorded_side_by_side_are_all_kept(engine: sa.Engine) -> None:
    """Each call of a fan-out records its upstream job from its own thread; the row
    ends with every one (a lost record would be submitted, and paid, again)."""
    job = _running(engine)
    LEASES.hold(job.id, TOKEN)
    upstream_jobs.UPSTREAMS.hold(job)
    try:
        with ThreadPoolExecutor(8) as pool:
            recorded = list(
                pool.map(
                    lambda i: upstream_jobs.UPSTREAMS.put(job.id, str(i), {"ref": {"id": i}}),
                    range(16),
                )
            )
    finally:
        upstream_jobs.UPSTREAMS.release(job.id)
        LEASES.release(job.id)
    assert all(recorded)
    assert sorted((_row(engine, job.id).upstream or {}), key=int) == [str(i) for i in range(16)]


def test_a_fan_outs_finished_call_is_kept_and_not_asked_again(
    engine: sa.Engine, queue: FakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call of a job of two images done while the other is still out: its
    images are kept in our storage, and the next look takes them from there (the
    provider may have deleted them meanwhile; asking again could pay again)."""

    class Storage:
        def __init__(self) -> None:
            self.objects: dict[str, bytes] = {}

        def put(self, key: str, data: bytes, content_type: str) -> None:
            self.objects[key] = data

        def get(self, key: str) -> bytes:
            return self.objects[key]

    storage = Storage()
    monkeypatch.setattr(upstream_jobs, "get_storage", lambda: storage)
    two = GenerationParams(model="queued", prompt="p", n=2, size="1024x1024")
    first_call = Call(SPEC, two, 1, first_index=0)
    job = _running(engine)
    queue.looks = 10  # done at the first look
    LEASES.hold(job.id, TOKEN)
    upstream_jobs.UPSTREAMS.hold(job)
    try:
        assert upstream_jobs.call(first_call, TARGET, job.id).images
    finally:
        upstream_jobs.UPSTREAMS.release(job.id)
        LEASES.release(job.id)
    kept = (_row(engine, job.id).upstream or {})["0"]["kept"]
    assert [storage.objects[name] for name in kept] == [b"png"]
    looks = queue.looks
    LEASES.hold(job.id, TOKEN)
    upstream_jobs.UPSTREAMS.hold(_row(engine, job.id))
    try:
        again = upstream_jobs.call(first_call, TARGET, job.id)
    finally:
        upstream_jobs.UPSTREAMS.release(job.id)
        LEASES.release(job.id)
    assert [image.data for image in again.images] == [b"png"]
    assert queue.looks == looks  # not asked again
    assert queue.submits == 1


def test_a_lost_cancel_is_sent_again_by_the_sweeper_until_one_is_done(
    engine: sa.Engine, queue: FakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job canceled while its upstream job ran there stays ``upstream_open`` until
    a cancel_upstream task has run; a minute on, the sweeper sends one again (the
    first was lost with the broker)."""
    job = _running(engine)
    with pytest.raises(UpstreamPending):
        _attempt(job)
    assert _row(engine, job.id).upstream_open
    with Session(engine) as session:
        assert lifecycle.cancel(session, job.id, utcnow() - timedelta(minutes=2))
        session.commit()
    sent: list[str] = []
    monkeypatch.setattr(sweeper, "publish_upstream_cancel", lambda job_id, q: sent.append(job_id))
    assert sweeper.cancel_upstream_left() == 1
    assert sent == [job.id]

    class Registry:
        def get(self, name: str) -> UpstreamModel:
            return SPEC

    monkeypatch.setattr(upstream_jobs, "get_registry", Registry)
    assert upstream_jobs.cancel(job.id) == 1  # the task's body
    assert not _row(engine, job.id).upstream_open
    assert sweeper.cancel_upstream_left() == 0
    assert queue.canceled == ["up-1"]
