"""Files (OpenAI's Files API): metadata here, bytes in storage."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from shared.core.clock import utcnow
from shared.core.columns import UTCDateTime, ts_field
from shared.core.ids import new_id


class File(SQLModel, table=True):
    """An uploaded (or batch-produced) file, as OpenAI's Files API; bytes in storage."""

    __table_args__ = (
        sa.Index("ix_file_project_id_id", "project_id", "id"),
        sa.Index("ix_file_expires_at", "expires_at"),
    )

    id: str = Field(default_factory=lambda: new_id("file"), primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="project.id", max_length=64)
    filename: str = Field(max_length=500)
    purpose: str = Field(max_length=32)
    bytes: int
    storage_key: str = Field(max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    deleted_at: datetime | None = ts_field()
    # OpenAI's expires_after (or the project's file retention, or a batch output's
    # batch's): past it the file is gone (404, unlisted) and the purge deletes it.
    expires_at: datetime | None = ts_field()
