"""Idempotency keys: a client's ``Idempotency-Key`` and what it created."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from shared.core.clock import utcnow
from shared.core.columns import UTCDateTime

# Longest key accepted (Stripe's limit; UUIDs and ULIDs fit many times over).
MAX_KEY_LENGTH = 255


class IdempotencyKey(SQLModel, table=True):
    __tablename__ = "idempotency_key"

    project_id: str = Field(foreign_key="project.id", primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=MAX_KEY_LENGTH)
    # sha256 of the method, path and canonical body: "the same request".
    fingerprint: str = Field(max_length=64)
    # What the first request created: a job, a batch or a file.
    resource: str = Field(max_length=16)
    resource_id: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)
