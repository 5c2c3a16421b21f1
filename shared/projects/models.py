"""Projects (the tenant every row belongs to) and their API keys."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from shared.core.clock import utcnow
from shared.core.columns import UTCDateTime, ts_field
from shared.core.ids import new_id


class Project(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("proj"), primary_key=True, max_length=64)
    name: str = Field(unique=True, index=True, max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # Limits; None takes the setting's default, 0 means unlimited.
    key_requests_per_minute: int | None = None
    images_per_day: int | None = None
    jobs_in_flight: int | None = None
    # Budgets in USD per UTC day and month; None: no budget (shared/projects/budgets.py).
    daily_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    # Bytes the project may keep stored (images, edit inputs, files); None: no quota.
    # Reached, new work is refused with 429 storage_quota_exceeded (shared/quota.py).
    storage_quota_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    # Retention in seconds (None: kept forever); the purge removes what is past it
    # (shared/retention/). Images (with edit inputs) from when they were made, files
    # from their upload (fixed as each file's expires_at), job rows from creation.
    image_retention_seconds: int | None = None
    file_retention_seconds: int | None = None
    job_retention_seconds: int | None = None
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
    last_used_at: datetime | None = ts_field()
    revoked_at: datetime | None = ts_field()
    # The key's own budgets, beside its project's (None: none).
    daily_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
