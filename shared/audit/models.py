"""The audit trail's one table: an event per admin action, written in the action's
own transaction (so an action rolled back leaves no event, and one committed
always has its event)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from shared.core.clock import utcnow
from shared.core.columns import UTCDateTime
from shared.core.ids import new_id


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"
    # The admin API's list filters by project and by action, newest first (by id).
    __table_args__ = (
        sa.Index("ix_audit_event_project_id_id", "project_id", "id"),
        sa.Index("ix_audit_event_action_id", "action", "id"),
    )

    # UUIDv7: time-ordered, the list's cursor.
    id: str = Field(default_factory=lambda: new_id("audit"), primary_key=True, max_length=64)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    # Who: "admin" (the admin key, IMAGEGEN_ADMIN_API_KEY), "cli" (the imagegen
    # command on the server's database) or a project key's id (``key_...``). Never
    # a secret.
    actor: str = Field(max_length=64)
    # The project the action concerns (no foreign key: the trail outlives what it names).
    project_id: str | None = Field(default=None, max_length=64)
    action: str = Field(max_length=64)  # project.create, key.revoke, job.delete, ...
    target: str = Field(max_length=200)  # the id (or name) of what it acted on
    details: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
