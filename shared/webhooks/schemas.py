"""Wire shapes of webhook endpoints and deliveries."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from shared.webhooks.models import DeliveryStatus


class EndpointCreate(BaseModel):
    url: str = Field(max_length=2000)
    events: list[str] | None = Field(default=None, max_length=100)
    description: str | None = Field(default=None, max_length=500)


class EndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None = None
    created_at: int
    disabled_at: int | None = None
    disabled_reason: str | None = None


class EndpointWithSecret(EndpointObject):
    """An endpoint as created or rotated: the only answers that carry its secret."""

    secret: str


class AttemptObject(BaseModel):
    number: int
    attempted_at: int
    status_code: int | None = None
    error: str | None = None
    duration_ms: int


class DeliveryObject(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_type: str
    url: str
    endpoint_id: str | None = None
    job_id: str | None = None
    status: DeliveryStatus
    attempts: int
    next_attempt_at: int | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: int
    attempt_log: list[AttemptObject]


class DefaultSecret(BaseModel):
    """The secret that signs per-job webhooks (``webhook_url`` on a request)."""

    key: str
