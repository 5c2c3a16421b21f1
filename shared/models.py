"""SQLModel tables. The SQL row is the truth; broker messages only say "run job X".

Every row carries ``project_id`` and every query in the services filters by it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from shared.ids import new_id
from shared.timeutil import utcnow


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware datetimes on every backend (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class Project(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("proj"), primary_key=True, max_length=64)
    name: str = Field(unique=True, index=True, max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # Limits; None takes the setting's default, 0 means unlimited.
    key_requests_per_minute: int | None = None
    images_per_day: int | None = None
    jobs_in_flight: int | None = None
    # Signs per-job webhooks (GET /v1/webhooks/default/secret); made on first use.
    webhook_secret: str | None = Field(default=None, max_length=100)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(default_factory=lambda: new_id("key"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", index=True, max_length=64)
    name: str = Field(default="default", max_length=200)
    # The identity behind the key: becomes wb_user_id on traces and the OpenAI
    # ``user`` field sent upstream when the request names none.
    user: str = Field(default="", max_length=200)
    # The first characters of the key, shown in listings; the key itself is never stored.
    prefix: str = Field(max_length=32)
    key_hash: str = Field(unique=True, index=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_used_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()


class Job(SQLModel, table=True):
    __table_args__ = (
        sa.Index("ix_job_project_id_id", "project_id", "id"),
        sa.Index("ix_job_queue_status_id", "queue", "status", "id"),
    )

    id: str = Field(default_factory=lambda: new_id("job"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", max_length=64)
    status: str = Field(default=JobStatus.queued, index=True, max_length=16)
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
    attempts: int = 0
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_type=sa.Text)
    usage: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    # The trace call recording this generation (None when tracking is off).
    call_id: str | None = Field(default=None, max_length=64)
    key_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    canceled_at: datetime | None = _ts()
    # Outbox bookkeeping: when the "run job X" message was last handed to the broker.
    published_at: datetime | None = _ts()
    # Set while running: the claim of one attempt, renewed by the worker's heartbeat.
    lease_token: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = _ts()


class Image(SQLModel, table=True):
    __table_args__ = (sa.UniqueConstraint("job_id", "index", name="uq_image_job_index"),)

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


class Call(SQLModel, table=True):
    """A trace call in Weave's CallSchema terms, one per tracked generation."""

    __table_args__ = (sa.Index("ix_call_project_started", "project_id", "started_at"),)

    id: str = Field(primary_key=True, max_length=64)  # a UUIDv7 string, as Weave's
    project_id: str = Field(foreign_key="project.id", max_length=64)
    op_name: str = Field(max_length=200, index=True)
    display_name: str | None = Field(default=None, max_length=200)
    trace_id: str = Field(max_length=64, index=True)
    parent_id: str | None = Field(default=None, max_length=64)
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ended_at: datetime | None = _ts()
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    inputs: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    output: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    exception: str | None = Field(default=None, sa_type=sa.Text)
    summary: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    wb_user_id: str | None = Field(default=None, max_length=200, index=True)
    job_id: str | None = Field(default=None, foreign_key="job.id", max_length=64, index=True)


class WebhookEndpoint(SQLModel, table=True):
    __tablename__ = "webhook_endpoint"

    id: str = Field(default_factory=lambda: new_id("we"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", index=True, max_length=64)
    url: str = Field(max_length=2000)
    events: list[str] = Field(sa_type=sa.JSON)
    secret: str = Field(max_length=100)
    description: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    disabled_at: datetime | None = _ts()
    disabled_reason: str | None = Field(default=None, max_length=500)
    deleted_at: datetime | None = _ts()


class WebhookDelivery(SQLModel, table=True):
    """One event for one target. Its id is the ``webhook-id``, stable across retries,
    and its payload is fixed when the event happens."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (sa.Index("ix_delivery_due", "status", "next_attempt_at"),)

    id: str = Field(default_factory=lambda: new_id("msg"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", index=True, max_length=64)
    endpoint_id: str | None = Field(default=None, foreign_key="webhook_endpoint.id",
                                    index=True, max_length=64)
    job_id: str | None = Field(default=None, index=True, max_length=64)
    url: str = Field(max_length=2000)
    event_type: str = Field(max_length=64)
    payload: dict[str, Any] = Field(sa_type=sa.JSON)
    # pending -> succeeded | failed (schedule exhausted, 410, or endpoint gone)
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # When a "deliver" message was last sent for the due attempt (the sweeper does
    # not send another while it is fresh), and the lease of the attempt running.
    dispatched_at: datetime | None = _ts()
    lease_expires_at: datetime | None = _ts()
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=1000)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class WebhookAttempt(SQLModel, table=True):
    __tablename__ = "webhook_attempt"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(foreign_key="webhook_delivery.id", index=True, max_length=64)
    number: int
    attempted_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=1000)
    duration_ms: int


class File(SQLModel, table=True):
    """An uploaded (or batch-produced) file, as OpenAI's Files API; bytes in storage."""

    __table_args__ = (sa.Index("ix_file_project_id_id", "project_id", "id"),)

    id: str = Field(default_factory=lambda: new_id("file"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", max_length=64)
    filename: str = Field(max_length=500)
    purpose: str = Field(max_length=32)
    bytes: int
    storage_key: str = Field(max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    deleted_at: datetime | None = _ts()


class Batch(SQLModel, table=True):
    __table_args__ = (sa.Index("ix_batch_project_id_id", "project_id", "id"),)

    id: str = Field(default_factory=lambda: new_id("batch"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", max_length=64)
    kind: str = Field(default="openai", max_length=16)  # openai (a file) | native (JSON)
    endpoint: str = Field(default="/v1/images/generations", max_length=100)
    input_file_id: str | None = Field(default=None, max_length=64)
    completion_window: str = Field(default="24h", max_length=16)
    # validating -> in_progress -> finalizing -> completed | failed | expired |
    # cancelling -> cancelled
    status: str = Field(default="validating", index=True, max_length=16)
    batch_metadata: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    errors: list[dict[str, Any]] | None = Field(default=None, sa_type=sa.JSON)
    output_file_id: str | None = Field(default=None, max_length=64)
    error_file_id: str | None = Field(default=None, max_length=64)
    webhook_url: str | None = Field(default=None, max_length=2000)
    total: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime | None = _ts()
    in_progress_at: datetime | None = _ts()
    finalizing_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    failed_at: datetime | None = _ts()
    expired_at: datetime | None = _ts()
    cancelling_at: datetime | None = _ts()
    cancelled_at: datetime | None = _ts()


class BatchItem(SQLModel, table=True):
    """One line of a batch. Its job runs it; its result is kept when the job ends."""

    __tablename__ = "batch_item"
    __table_args__ = (
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_item_custom_id"),
        sa.Index("ix_batch_item_batch_status_line", "batch_id", "status", "line"),
    )

    id: str = Field(default_factory=lambda: new_id("batch_req"), primary_key=True,
                    max_length=64)
    batch_id: str = Field(foreign_key="batch.id", max_length=64)
    project_id: str = Field(foreign_key="project.id", max_length=64)
    line: int
    custom_id: str = Field(max_length=500)
    body: dict[str, Any] = Field(sa_type=sa.JSON)
    # pending (no job yet) -> queued (job made) -> succeeded | failed | canceled
    status: str = Field(default="pending", max_length=16)
    job_id: str | None = Field(default=None, max_length=64)
    status_code: int | None = None
    error: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    finished_at: datetime | None = _ts()


def table(model: type[SQLModel]) -> sa.Table:
    """A model's Core table, for bulk statements that skip the ORM's per-row work."""
    return cast(sa.Table, model.__table__)  # type: ignore[attr-defined]
