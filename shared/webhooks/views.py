
from __future__ import annotations

from typing import Any

from shared.core.clock import to_unix
from shared.webhooks.models import WebhookDelivery, WebhookEndpoint


def endpoint_view(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": endpoint.id, "object": "webhook_endpoint", "url": endpoint.url,
        "events": endpoint.events, "description": endpoint.description,
        "created_at": to_unix(endpoint.created_at),
        "disabled_at": to_unix(endpoint.disabled_at),
        "disabled_reason": endpoint.disabled_reason,
    }
    if with_secret:  # only when created or rotated
        view["secret"] = endpoint.secret
    return view



def delivery_view(delivery: WebhookDelivery, attempts: list[Any]) -> dict[str, Any]:
    return {
        "id": delivery.id, "object": "webhook_delivery", "event_type": delivery.event_type,
        "url": delivery.url, "endpoint_id": delivery.endpoint_id, "job_id": delivery.job_id,
        "status": delivery.status, "attempts": delivery.attempts,
        "next_attempt_at": to_unix(delivery.next_attempt_at)
        if delivery.status == "pending" else None,
        "last_status_code": delivery.last_status_code, "last_error": delivery.last_error,
        "created_at": to_unix(delivery.created_at),
        "attempt_log": [{"number": a.number, "attempted_at": to_unix(a.attempted_at),
                         "status_code": a.status_code, "error": a.error,
                         "duration_ms": a.duration_ms} for a in attempts],
    }
