"""Rendering webhook endpoints and deliveries."""

from __future__ import annotations

from shared.core.clock import to_unix
from shared.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from shared.webhooks.schemas import (
    AttemptObject,
    DeliveryObject,
    EndpointObject,
    EndpointWithSecret,
)


def endpoint_view(endpoint: WebhookEndpoint) -> EndpointObject:
    return EndpointObject(
        id=endpoint.id,
        url=endpoint.url,
        events=endpoint.events,
        description=endpoint.description,
        created_at=to_unix(endpoint.created_at) or 0,
        disabled_at=to_unix(endpoint.disabled_at),
        disabled_reason=endpoint.disabled_reason,
    )


def endpoint_with_secret(endpoint: WebhookEndpoint) -> EndpointWithSecret:
    """Only when an endpoint is created or its secret rotated."""
    return EndpointWithSecret(**endpoint_view(endpoint).model_dump(), secret=endpoint.secret)


def delivery_view(delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryObject:
    pending = delivery.status == DeliveryStatus.pending
    return DeliveryObject(
        id=delivery.id,
        event_type=delivery.event_type,
        url=delivery.url,
        endpoint_id=delivery.endpoint_id,
        job_id=delivery.job_id,
        status=DeliveryStatus(delivery.status),
        attempts=delivery.attempts,
        next_attempt_at=to_unix(delivery.next_attempt_at) if pending else None,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        created_at=to_unix(delivery.created_at) or 0,
        attempt_log=[
            AttemptObject(
                number=a.number,
                attempted_at=to_unix(a.attempted_at) or 0,
                status_code=a.status_code,
                error=a.error,
                duration_ms=a.duration_ms,
            )
            for a in attempts
        ],
    )
