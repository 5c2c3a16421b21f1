"""The purge on PostgreSQL and S3 (moto over HTTP): two purges at once take
different rows (FOR UPDATE SKIP LOCKED) and delete each object once, in
DeleteObjects calls of up to 1,000 keys; killed halfway and run again it purges
exactly; nothing within its time is touched; a presigned URL never outlives its
image. Rows and objects are written in bulk (tests/support/expired.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse
from uuid import uuid4

import boto3
import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col

import shared.models  # noqa: F401  (every table, for create_all)
from shared.core.clock import utcnow
from shared.core.ids import new_id
from shared.core.settings import Settings
from shared.core.storage import S3Storage
from shared.jobs.models import Image, Job, JobStatus
from shared.jobs.views import render_result
from shared.projects.models import Project
from shared.retention import purge
from shared.retention.purge import UnitOfWork, purge_once
from shared.webhooks.models import WebhookDelivery
from tests.support.expired import seed_jobs
from tests.support.processes import create_database, drop_database


@pytest.fixture(scope="module")
def engine() -> Iterator[sa.Engine]:
    url = create_database()
    engine = sa.create_engine(url, pool_size=4)
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()
    drop_database(url)


@pytest.fixture
def storage(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    bucket = f"purge-{uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return S3Storage(Settings(s3_bucket=bucket, s3_endpoint_url=s3_endpoint))


def uow_of(engine: sa.Engine) -> UnitOfWork:
    @contextmanager
    def uow() -> Iterator[Session]:
        with Session(engine) as session, session.begin():
            yield session

    return uow


def project(engine: sa.Engine, retention: int | None) -> str:
    row = Project(name=f"p-{uuid4().hex[:8]}", image_retention_seconds=retention)
    with Session(engine) as session, session.begin():
        session.add(row)
        session.flush()
        return row.id


def stored(storage: S3Storage) -> set[str]:
    return {o.key for o in storage.scan("")}


def expired_count(engine: sa.Engine, keys: list[str]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(Image)
                .where(col(Image.storage_key).in_(keys), col(Image.expired_at).is_not(None))
            ).scalar_one()
        )


class Counting:
    """The storage's deletes, counted (keys and calls) across threads."""

    def __init__(self, storage: S3Storage) -> None:
        self.keys: list[str] = []
        self.calls = 0
        self.lock = threading.Lock()
        self.real = storage.delete

    def __call__(self, keys: list[str]) -> int:
        calls = self.real(keys)
        with self.lock:
            self.keys += keys
            self.calls += calls
        return calls


def put_of(storage: S3Storage) -> Callable[[str], None]:
    return lambda key: storage.put(key, b"x", "image/png")


def test_two_purges_at_once_delete_each_object_once(
    engine: sa.Engine, storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = project(engine, 3600)
    fresh = project(engine, 3600)
    now = utcnow()
    expired = seed_jobs(
        engine, put_of(storage), old, jobs=40, images_per_job=3, created_at=now - timedelta(hours=2)
    )
    kept = seed_jobs(
        engine,
        put_of(storage),
        fresh,
        jobs=5,
        images_per_job=2,
        created_at=now - timedelta(minutes=5),
    )
    monkeypatch.setattr(purge, "CHUNK", 10)
    counting = Counting(storage)
    monkeypatch.setattr(storage, "delete", counting)
    uow = uow_of(engine)
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        purge_once(storage, now, uow)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(counting.keys) == sorted(expired)  # each once, none in its time
    assert counting.calls == 12  # 120 images in chunks of 10
    assert stored(storage) == set(kept)
    assert expired_count(engine, expired) == 120
    assert expired_count(engine, kept) == 0


def test_killed_halfway_then_run_again(
    engine: sa.Engine, storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = project(engine, 3600)
    now = utcnow()
    keys = seed_jobs(
        engine, put_of(storage), pid, jobs=10, images_per_job=3, created_at=now - timedelta(hours=2)
    )
    monkeypatch.setattr(purge, "CHUNK", 10)
    real = storage.delete
    seen = {"calls": 0}

    def killed_after_first_chunk(chunk: list[str]) -> int:
        seen["calls"] += 1
        if seen["calls"] == 2:
            real(chunk[:4])  # part of the second chunk's objects went first
            raise KeyboardInterrupt  # the worker killed
        return real(chunk)

    monkeypatch.setattr(storage, "delete", killed_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        purge_once(storage, now, uow_of(engine))
    assert expired_count(engine, keys) == 10
    assert len(stored(storage) & set(keys)) == 16

    monkeypatch.setattr(storage, "delete", real)
    again = purge_once(storage, now, uow_of(engine))
    assert again.images == 20
    assert expired_count(engine, keys) == 30
    assert not stored(storage) & set(keys)


def test_a_presigned_url_never_outlives_its_image(engine: sa.Engine, storage: S3Storage) -> None:
    pid = project(engine, 3600)
    now = utcnow()
    keys = seed_jobs(
        engine,
        put_of(storage),
        pid,
        jobs=1,
        images_per_job=1,
        created_at=now - timedelta(minutes=50),
    )
    with Session(engine) as session:
        image = session.execute(
            sa.select(Image).where(col(Image.storage_key) == keys[0])
        ).scalar_one()
        job = session.get(Job, image.job_id)
        assert job is not None
        data = render_result(job, [image], storage, "http://x", 3600, retention_seconds=3600).data
    expires = int(parse_qs(urlparse(data[0].url or "").query)["X-Amz-Expires"][0])
    assert 590 <= expires <= 600  # the ten minutes left of its hour, not the URL's hour


def test_a_failed_edits_inputs_expire_and_a_job_with_a_pending_webhook_stays(
    engine: sa.Engine, storage: S3Storage
) -> None:
    """On PostgreSQL (the claim is FOR UPDATE SKIP LOCKED over NOT EXISTS): a failed
    edit's inputs go at its project's image retention, marked 0 bytes; a job past
    its job retention with a webhook delivery still pending is not removed."""
    edits, pid = project(engine, 3600), project(engine, None)
    now = utcnow()
    ended = now - timedelta(days=2)
    edit, hooked, removed = new_id("job"), new_id("job"), new_id("job")
    inputs = [f"{edits}/{edit}/input-0.png", f"{edits}/{edit}/mask.png"]
    base: dict[str, Any] = {"model": "procedural", "created_at": ended, "finished_at": ended}
    with Session(engine) as session, session.begin():
        session.get(Project, pid).job_retention_seconds = 3600  # type: ignore[union-attr]
        session.add(
            Job(
                id=edit,
                project_id=edits,
                status=JobStatus.failed,
                request={"prompt": "x", "images": inputs[:1], "mask": inputs[1]},
                input_bytes=2,
                **base,
            )
        )
        session.flush()
        for job_id, status in ((hooked, "pending"), (removed, "failed")):
            session.add(
                Job(id=job_id, project_id=pid, status=JobStatus.succeeded, request={}, **base)
            )
            session.flush()
            session.add(
                WebhookDelivery(
                    project_id=pid,
                    job_id=job_id,
                    url="http://127.0.0.1:9/",
                    event_type="job.succeeded",
                    payload={},
                    status=status,
                )
            )
    for key in inputs:
        storage.put(key, b"x", "image/png")

    done = purge_once(storage, now, uow_of(engine))
    assert done.inputs == 1
    assert not stored(storage) & set(inputs)
    with Session(engine) as session:
        row = session.get(Job, edit)
        assert row is not None
        assert row.input_bytes == 0
        assert session.get(Job, hooked) is not None
        assert session.get(Job, removed) is None
    # Its inputs done, the edit is not taken again.
    assert purge_once(storage, now, uow_of(engine)).inputs == 0
