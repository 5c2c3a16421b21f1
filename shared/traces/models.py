"""Trace calls (Weave's CallSchema), one per tracked generation."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from shared.core.clock import utcnow
from shared.core.columns import UTCDateTime, ts_field


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
    ended_at: datetime | None = ts_field()
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    inputs: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    output: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    exception: str | None = Field(default=None, sa_type=sa.Text)
    summary: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    wb_user_id: str | None = Field(default=None, max_length=200, index=True)
    job_id: str | None = Field(default=None, foreign_key="job.id", max_length=64, index=True)
