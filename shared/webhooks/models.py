"""Webhook endpoints, deliveries (the outbox of events) and their attempts."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from shared.core.clock import utcnow
from shared.core.columns import UTCDateTime, ts_field
from shared.core.ids import new_id

JOB_EVENTS = ("job.started", "job.succeeded", "job.failed", "job.canceled")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
ALL_EVENTS = JOB_EVENTS + BATCH_EVENTS


class DeliveryStatus(StrEnum):
    """pending -> succeeded | failed (schedule exhausted, 410, endpoint gone, or an
    unsafe target); ``redeliver`` puts a delivery back to pending."""

    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"


class WebhookEndpoint(SQLModel, table=True):
    __tablename__ = "webhook_endpoint"

    id: str = Field(default_factory=lambda: new_id("we"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", index=True, max_length=64)
    url: str = Field(max_length=2000)
    events: list[str] = Field(sa_type=sa.JSON)
    secret: str = Field(max_length=100)
    description: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    disabled_at: datetime | None = ts_field()
    disabled_reason: str | None = Field(default=None, max_length=500)
    deleted_at: datetime | None = ts_field()


class WebhookDelivery(SQLModel, table=True):
    """One event for one target. Its id is the ``webhook-id``, stable across retries,
    and its payload is fixed when the event happens."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (sa.Index("ix_delivery_due", "status", "next_attempt_at"),)

    id: str = Field(default_factory=lambda: new_id("msg"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", index=True, max_length=64)
    endpoint_id: str | None = Field(
        default=None, foreign_key="webhook_endpoint.id", index=True, max_length=64
    )
    job_id: str | None = Field(default=None, index=True, max_length=64)
    url: str = Field(max_length=2000)
    event_type: str = Field(max_length=64)
    payload: dict[str, Any] = Field(sa_type=sa.JSON)
    status: str = Field(default=DeliveryStatus.pending, max_length=16)
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # When a "deliver" message was last sent for the due attempt (the sweeper does
    # not send another while it is fresh), and the lease of the attempt running.
    dispatched_at: datetime | None = ts_field()
    lease_expires_at: datetime | None = ts_field()
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
