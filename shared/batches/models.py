"""Batches and their lines (items)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from shared.core.clock import utcnow
from shared.core.columns import UTCDateTime, ts_field
from shared.core.ids import new_id


class BatchStatus(StrEnum):
    """OpenAI's batch states, plus ``expiring``: past its window, its running lines
    draining (shown as ``finalizing``)."""

    validating = "validating"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"
    expiring = "expiring"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"


# validating -> in_progress (lines made) | failed (the input is bad) | cancelling
# in_progress -> finalizing (every line ended) | expiring (past its window) | cancelling
# expiring | cancelling -> finalizing (once no line is running)
# finalizing -> completed | expired | cancelled (output files written)
BATCH_TRANSITIONS: dict[BatchStatus, tuple[BatchStatus, ...]] = {
    BatchStatus.validating: (BatchStatus.in_progress, BatchStatus.failed, BatchStatus.cancelling),
    BatchStatus.in_progress: (BatchStatus.finalizing, BatchStatus.expiring, BatchStatus.cancelling),
    BatchStatus.expiring: (BatchStatus.finalizing,),
    BatchStatus.cancelling: (BatchStatus.finalizing,),
    BatchStatus.finalizing: (BatchStatus.completed, BatchStatus.expired, BatchStatus.cancelled),
    BatchStatus.completed: (),
    BatchStatus.failed: (),
    BatchStatus.expired: (),
    BatchStatus.cancelled: (),
}
TERMINAL = tuple(status for status, moves in BATCH_TRANSITIONS.items() if not moves)
# Pumped: lines are started (in_progress) or drained (expiring, cancelling).
PUMPED = (BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.expiring)
# What a batch that reaches finalizing from each status ends as.
FINAL_STATUS = {
    BatchStatus.in_progress: BatchStatus.completed,
    BatchStatus.cancelling: BatchStatus.cancelled,
    BatchStatus.expiring: BatchStatus.expired,
}


class ItemStatus(StrEnum):
    """A line: pending (no job yet) -> queued (its job made) -> succeeded | failed |
    canceled (its job ended, or the batch stopped before it ran)."""

    pending = "pending"
    queued = "queued"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


class Batch(SQLModel, table=True):
    __table_args__ = (sa.Index("ix_batch_project_id_id", "project_id", "id"),)

    id: str = Field(default_factory=lambda: new_id("batch"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", max_length=64)
    # The key that created it: its lines' jobs carry it, and count against its own
    # budgets (shared/batches/pump.py). None for batches made before it was kept.
    key_id: str | None = Field(default=None, max_length=64)
    kind: str = Field(default="openai", max_length=16)  # openai (a file) | native (JSON)
    endpoint: str = Field(default="/v1/images/generations", max_length=100)
    input_file_id: str | None = Field(default=None, max_length=64)
    completion_window: str = Field(default="24h", max_length=16)
    # OpenAI's output_expires_after (seconds from the output file's creation); None:
    # the project's file retention.
    output_expires_after_seconds: int | None = None
    status: str = Field(default=BatchStatus.validating, index=True, max_length=16)
    batch_metadata: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    errors: list[dict[str, Any]] | None = Field(default=None, sa_type=sa.JSON)
    output_file_id: str | None = Field(default=None, max_length=64)
    error_file_id: str | None = Field(default=None, max_length=64)
    webhook_url: str | None = Field(default=None, max_length=2000)
    total: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime | None = ts_field()
    in_progress_at: datetime | None = ts_field()
    finalizing_at: datetime | None = ts_field()
    completed_at: datetime | None = ts_field()
    failed_at: datetime | None = ts_field()
    expired_at: datetime | None = ts_field()
    cancelling_at: datetime | None = ts_field()
    cancelled_at: datetime | None = ts_field()
    # Deleted on demand (issue 29): a tombstone, read as absent (404); its jobs'
    # images and its files gone.
    deleted_at: datetime | None = ts_field()


class BatchItem(SQLModel, table=True):
    """One line of a batch. Its job runs it; its result is kept when the job ends."""

    __tablename__ = "batch_item"
    __table_args__ = (
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_item_custom_id"),
        sa.Index("ix_batch_item_batch_status_line", "batch_id", "status", "line"),
    )

    id: str = Field(default_factory=lambda: new_id("batch_req"), primary_key=True, max_length=64)
    batch_id: str = Field(foreign_key="batch.id", max_length=64)
    project_id: str = Field(foreign_key="project.id", max_length=64)
    line: int
    custom_id: str = Field(max_length=500)
    body: dict[str, Any] = Field(sa_type=sa.JSON)
    status: str = Field(default=ItemStatus.pending, max_length=16)
    job_id: str | None = Field(default=None, max_length=64)
    status_code: int | None = None
    error: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    finished_at: datetime | None = ts_field()
