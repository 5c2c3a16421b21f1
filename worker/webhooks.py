"""Deliver one webhook attempt, signed as Standard Webhooks.

2xx is success; redirects are not followed (a 3xx is a failed attempt); 410 Gone
disables the endpoint; other failures retry on the schedule (a setting), or
after ``Retry-After`` when the receiver sends one. State lives in the delivery
row, so a worker restart between attempts loses nothing: the sweeper sends
whatever is due.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import timedelta

import httpx
import sqlalchemy as sa
from sqlmodel import col
from standardwebhooks.webhooks import Webhook

from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.errors import UnresolvableTarget, UnsafeTarget
from shared.core.instruments import WEBHOOK_DELIVERIES
from shared.core.settings import get_settings
from shared.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shared.webhooks.service import default_secret, disable_endpoint
from shared.webhooks.targets import check_target
from worker.resources import webhook_client

log = logging.getLogger(__name__)


def _lease() -> timedelta:
    """Long enough for one attempt; a worker killed mid-attempt frees it this soon."""
    return timedelta(seconds=2 * get_settings().webhook_timeout_seconds + 5)


def _claim(delivery_id: str) -> WebhookDelivery | None:
    now = utcnow()
    with unit_of_work() as session:
        result = session.execute(
            sa.update(WebhookDelivery)
            .where(
                col(WebhookDelivery.id) == delivery_id,
                col(WebhookDelivery.status) == DeliveryStatus.pending,
                col(WebhookDelivery.next_attempt_at) <= now,
                sa.or_(
                    col(WebhookDelivery.lease_expires_at).is_(None),
                    col(WebhookDelivery.lease_expires_at) < now,
                ),
            )
            .values(lease_expires_at=now + _lease(), attempts=WebhookDelivery.attempts + 1)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        return session.get(WebhookDelivery, delivery_id)


def _secret_and_endpoint(delivery: WebhookDelivery) -> tuple[str | None, str | None]:
    """The signing secret, or (None, reason) when the target is gone."""
    with unit_of_work() as session:
        if delivery.endpoint_id is None:
            return default_secret(session, delivery.project_id), None
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None or endpoint.deleted_at is not None:
            return None, "endpoint deleted"
        if endpoint.disabled_at is not None:
            return None, f"endpoint disabled: {endpoint.disabled_reason}"
        return endpoint.secret, None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(86400.0, max(0.0, float(response.headers["retry-after"])))
    except (KeyError, ValueError):
        return None


def deliver(delivery_id: str) -> str:
    delivery = _claim(delivery_id)
    if delivery is None:
        return "skipped"
    settings = get_settings()
    secret, gone = _secret_and_endpoint(delivery)
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None
    started = time.monotonic()
    permanent = secret is None
    if secret is None:
        error = gone
    else:
        body = json.dumps(delivery.payload, separators=(",", ":"))
        try:
            target = check_target(
                delivery.url, allow_private=settings.webhook_allow_private_targets
            )
            now = utcnow()
            headers = {
                "content-type": "application/json",
                "user-agent": "imagegen-webhooks/1",
                "host": target.host_header,
                "webhook-id": delivery.id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": Webhook(secret).sign(delivery.id, now, body),
            }
            extensions = {"sni_hostname": target.url.host} if target.url.scheme == "https" else {}
            response = webhook_client().post(
                target.connect_url(), content=body, headers=headers, extensions=extensions
            )
            status_code = response.status_code
            retry_after = _retry_after(response)
            if not 200 <= status_code < 300:
                error = f"receiver answered {status_code}"
        except UnsafeTarget as exc:
            error, permanent = exc.message, True  # retrying cannot make it safe
        except UnresolvableTarget as exc:
            error = exc.message
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
    duration_ms = int((time.monotonic() - started) * 1000)
    outcome = _record(delivery, status_code, error, retry_after, duration_ms, permanent)
    WEBHOOK_DELIVERIES.labels(outcome).inc()
    return outcome


def _record(
    delivery: WebhookDelivery,
    status_code: int | None,
    error: str | None,
    retry_after: float | None,
    duration_ms: int,
    permanent: bool,
) -> str:
    schedule = get_settings().webhook_retry_schedule
    now = utcnow()
    values: dict[str, object] = {
        "last_status_code": status_code,
        "last_error": error,
        "lease_expires_at": None,
        "updated_at": now,
    }
    disable = False
    if error is None:
        values["status"] = DeliveryStatus.succeeded
    elif status_code == 410 or permanent:
        values["status"] = DeliveryStatus.failed  # gone, or refused as unsafe: retrying cannot help
        disable = status_code == 410
    elif delivery.attempts >= len(schedule):
        values["status"] = DeliveryStatus.failed
    else:
        delay = schedule[delivery.attempts] * random.uniform(0.9, 1.1)  # jitter
        if retry_after is not None:
            delay = max(delay, retry_after)
        values["next_attempt_at"] = now + timedelta(seconds=delay)
        values["dispatched_at"] = None
    with unit_of_work() as session:
        session.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                number=delivery.attempts,
                status_code=status_code,
                error=error,
                duration_ms=duration_ms,
            )
        )
        session.execute(
            sa.update(WebhookDelivery)
            .where(col(WebhookDelivery.id) == delivery.id)
            .values(**values)
        )
        if disable and delivery.endpoint_id is not None:
            disable_endpoint(
                session, delivery.project_id, delivery.endpoint_id, "receiver answered 410 Gone"
            )
    log.info(
        "webhook %s attempt %d: %s",
        delivery.id,
        delivery.attempts,
        error or f"delivered ({status_code})",
    )
    return str(values.get("status", "retrying"))
