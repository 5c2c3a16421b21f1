"""Jobs and their images. The SQL row is the truth; a broker message only says
"run job X"."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import AutoString, Field, SQLModel

from shared.core.clock import utcnow
from shared.core.columns import UTCDateTime, ts_field
from shared.core.ids import new_id


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


# The moves a job makes, each a guarded UPDATE whose WHERE names the sources:
#   queued -> running (a worker claims it) or canceled
#   running -> succeeded | failed (its attempt ends) or canceled,
#              or queued again (its lease expired: the worker died) or running
#              again (another worker claims it once the lease expired)
TRANSITIONS: dict[JobStatus, tuple[JobStatus, ...]] = {
    JobStatus.queued: (JobStatus.running, JobStatus.canceled),
    JobStatus.running: (
        JobStatus.succeeded,
        JobStatus.failed,
        JobStatus.canceled,
        JobStatus.queued,
        JobStatus.running,
    ),
    JobStatus.succeeded: (),
    JobStatus.failed: (),
    JobStatus.canceled: (),
}


def moves_to(target: JobStatus) -> tuple[JobStatus, ...]:
    """The statuses a job may move to ``target`` from, in TRANSITIONS' order: what the
    WHERE of a guarded UPDATE to ``target`` names (shared/jobs/lifecycle.py)."""
    return tuple(status for status, moves in TRANSITIONS.items() if target in moves)


# Where a job enters: every job is recorded queued.
START = JobStatus.queued
FINISHED = tuple(status for status, moves in TRANSITIONS.items() if not moves)
CANCELABLE = moves_to(JobStatus.canceled)
# Held by an attempt under its lease token: the statuses an attempt can end from.
LEASED = moves_to(JobStatus.succeeded)
# Waiting for a worker: claimed without taking over anyone's lease.
WAITING = tuple(status for status in moves_to(JobStatus.running) if status not in LEASED)


class StatusType(sa.types.TypeDecorator[JobStatus]):
    """A job's status: a ``JobStatus`` in Python, a VARCHAR(16) in the database as it
    always was (no native enum type to migrate when a status is added)."""

    impl = AutoString(length=16)
    cache_ok = True

    def process_result_value(self, value: str | None, dialect: sa.Dialect) -> JobStatus | None:
        return None if value is None else JobStatus(value)


class Job(SQLModel, table=True):
    __table_args__ = (
        sa.Index("ix_job_project_id_id", "project_id", "id"),
        sa.Index("ix_job_queue_status_id", "queue", "status", "id"),
        sa.Index("ix_job_upstream_open_status", "upstream_open", "status"),
        # The deadline sweep: jobs still waiting past their Cancel-After (few have one).
        sa.Index("ix_job_deadline_at", "deadline_at"),
        # The purge: a request's own image life, and job rows past their project's
        # retention (shared/retention/purge.py).
        sa.Index("ix_job_images_expire_at", "images_expire_at"),
        sa.Index("ix_job_project_id_created_at", "project_id", "created_at"),
        # Storage accounting: a project's edits' input bytes (shared/usage.py), summed
        # over its edits only.
        sa.Index(
            "ix_job_project_id_input_bytes",
            "project_id",
            "input_bytes",
            postgresql_where=sa.text("input_bytes IS NOT NULL"),
            sqlite_where=sa.text("input_bytes IS NOT NULL"),
        ),
        # Storage accounting: a project's deleted jobs (few), whose images it no
        # longer counts.
        sa.Index(
            "ix_job_deleted_project_id",
            "project_id",
            postgresql_where=sa.text("deleted_at IS NOT NULL"),
            sqlite_where=sa.text("deleted_at IS NOT NULL"),
        ),
    )

    id: str = Field(default_factory=lambda: new_id("job"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", max_length=64)
    # Written only by shared/jobs/lifecycle.py, each move guarded by TRANSITIONS.
    status: JobStatus = Field(default=START, index=True, sa_type=StatusType)
    surface: str = Field(default="openai", max_length=16)
    model: str = Field(max_length=200)
    queue: str = Field(default="default", max_length=64)
    # Per-job webhook (signed with the project's default secret), and its events.
    webhook_url: str | None = Field(default=None, max_length=2000)
    webhook_events: list[str] | None = Field(default=None, sa_type=sa.JSON)
    # Set when the job runs one line of a batch.
    batch_id: str | None = Field(default=None, max_length=64, index=True)
    batch_item_id: str | None = Field(default=None, max_length=64)
    request: dict[str, Any] = Field(sa_type=sa.JSON)
    # An edit's stored inputs and mask, in bytes (storage accounting, shared/usage.py).
    input_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    attempts: int = 0
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_type=sa.Text)
    usage: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    # {"model": m, "deployment": d}: what made its images (a fallback, a deployment).
    served_by: dict[str, str] | None = Field(default=None, sa_type=sa.JSON)
    # USD, from the serving model's price; None where it has none.
    cost_usd: float | None = None
    # A queue provider's jobs for this one (issue 27): call key ("model/deployment/
    # first image") -> what its submit returned, recorded right after the submit so a
    # worker that dies then never submits again (worker/upstream_jobs.py).
    upstream: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    # Some of those may still run there: set with a record, cleared once a canceled
    # job's are canceled (the sweeper repairs a lost cancel_upstream by it).
    upstream_open: bool = Field(
        default=False, sa_column_kwargs={"server_default": sa.false(), "nullable": False}
    )
    # What a running job waits on, when it waits (storage being out), else None.
    status_detail: str | None = Field(default=None, sa_type=sa.Text)
    # {"step": s, "steps": t} while a local model denoises (throttled writes).
    progress: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    # The trace call recording this generation (None when tracking is off).
    call_id: str | None = Field(default=None, max_length=64)
    key_id: str | None = Field(default=None, max_length=64)
    # The API request that created it (X-Request-Id), carried by the worker's logs.
    request_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = ts_field()
    finished_at: datetime | None = ts_field()
    canceled_at: datetime | None = ts_field()
    # Outbox bookkeeping: when the "run job X" message was last handed to the broker.
    published_at: datetime | None = ts_field()
    # Set while running: the claim of one attempt, renewed by the worker's heartbeat.
    lease_token: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = ts_field()
    # Cancel-After (issue 29): not finished by then, it ends canceled with
    # ``deadline_exceeded``, never sent upstream if it had not started.
    deadline_at: datetime | None = ts_field()
    # Deleted on demand (issue 29): a tombstone, read as absent (404), its images,
    # inputs and kept upstream images gone from storage.
    deleted_at: datetime | None = ts_field()
    # Image-Expires-After (issue 29): the request's own shorter life for its images,
    # counted from the request, capped at the project's image retention.
    images_expire_at: datetime | None = ts_field()


class Image(SQLModel, table=True):
    __table_args__ = (
        sa.UniqueConstraint("job_id", "index", name="uq_image_job_index"),
        # The purge's look for images past their project's retention: only those
        # still stored are indexed, so the index shrinks as they expire.
        sa.Index(
            "ix_image_live_project_id_created_at",
            "project_id",
            "created_at",
            postgresql_where=sa.text("expired_at IS NULL"),
            sqlite_where=sa.text("expired_at IS NULL"),
        ),
        # Storage accounting: a project's live image bytes summed from the index
        # alone (shared/usage.py).
        sa.Index(
            "ix_image_live_project_id_size_bytes",
            "project_id",
            "size_bytes",
            postgresql_where=sa.text("expired_at IS NULL"),
            sqlite_where=sa.text("expired_at IS NULL"),
        ),
    )

    id: str = Field(default_factory=lambda: new_id("img"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", index=True, max_length=64)
    job_id: str = Field(foreign_key="job.id", index=True, max_length=64)
    index: int
    storage_key: str = Field(max_length=500)
    content_type: str = Field(max_length=64)
    width: int
    height: int
    size_bytes: int
    revised_prompt: str | None = Field(default=None, sa_type=sa.Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # Past its life (issue 29): its object deleted by the purge (marked first), its
    # job still readable with an ``expired`` marker in its place.
    expired_at: datetime | None = ts_field()
