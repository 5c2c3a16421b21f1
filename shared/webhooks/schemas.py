"""Wire shapes of webhook endpoints and deliveries."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.core.schemas import Schema
from shared.webhooks.models import DeliveryStatus


class EndpointCreate(Schema):
    """``POST /v1/webhooks/endpoints``: a project-wide receiver of events."""

    url: str = Field(max_length=2000)
    """Where events are POSTed. Private and loopback addresses are refused unless
    ``IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS`` is set."""
    events: list[str] | None = Field(default=None, max_length=100)
    """Which events it receives (``job.started``, ``job.succeeded``, ``job.failed``,
    ``job.canceled``, ``batch.completed``, ``batch.failed``, ``batch.expired``,
    ``batch.cancelled``); all of them when null."""
    description: str | None = Field(default=None, max_length=500)
    """A note for people."""


class EndpointObject(Schema):
    """A webhook endpoint, without its secret."""

    id: str
    """The endpoint's id (``we_...``)."""
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    """Always ``webhook_endpoint``."""
    url: str
    """Where events are POSTed."""
    events: list[str]
    """The events it receives."""
    description: str | None = None
    """A note for people."""
    created_at: int
    """Unix seconds."""
    disabled_at: int | None = None
    """When deliveries to it stopped, Unix seconds."""
    disabled_reason: str | None = None
    """Why deliveries stopped (``receiver answered 410 Gone``)."""


class EndpointWithSecret(EndpointObject):
    """An endpoint as created or rotated: the only answers that carry its secret."""

    secret: str
    """The signing secret (``whsec_...``, Standard Webhooks): verify the
    ``webhook-signature`` header with it."""


class AttemptObject(Schema):
    """One try at delivering an event."""

    number: int
    """1 for the first try."""
    attempted_at: int
    """Unix seconds."""
    status_code: int | None = None
    """The receiver's HTTP status; null when no answer came."""
    error: str | None = None
    """Why the try failed, if it did."""
    duration_ms: int
    """How long the try took."""


class DeliveryObject(Schema):
    """An event on its way to a receiver, with every try so far."""

    id: str
    """The delivery's id (``msg_...``): the ``webhook-id`` header, the same on every
    retry, so a receiver can drop duplicates."""
    object: Literal["webhook_delivery"] = "webhook_delivery"
    """Always ``webhook_delivery``."""
    event_type: str
    """The event (``job.succeeded``, ``batch.completed``, ...)."""
    url: str
    """Where it is delivered."""
    endpoint_id: str | None = None
    """The endpoint it goes to; null for a per-job ``webhook_url``."""
    job_id: str | None = None
    """The job it is about, for job events."""
    status: DeliveryStatus
    """``pending`` (retrying on a schedule), ``succeeded`` or ``failed``."""
    attempts: int
    """Tries so far."""
    next_attempt_at: int | None = None
    """When the next try is due, while pending, Unix seconds."""
    last_status_code: int | None = None
    """The receiver's status on the last try."""
    last_error: str | None = None
    """Why the last try failed."""
    created_at: int
    """Unix seconds."""
    attempt_log: list[AttemptObject]
    """Every try, in order."""


class DefaultSecret(Schema):
    """The secret that signs per-job webhooks (``webhook_url`` on a request)."""

    key: str
    """The signing secret (``whsec_...``)."""
