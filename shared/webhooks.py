"""Webhook endpoints, secrets, and turning job events into deliveries.

Deliveries are written in the same transaction as the job transition that causes
them (an outbox): an event is never lost between the two, and a worker restart
only delays it. The payload is fixed when the event happens, so every retry
carries the same body under the same ``webhook-id``.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from typing import Any

from sqlmodel import Session, col, select

from shared.errors import InvalidRequest, NotFound
from shared.models import Image, Job, Project, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shared.settings import get_settings
from shared.storage import get_storage
from shared.targets import check_target
from shared.timeutil import utcnow

JOB_EVENTS = ("job.started", "job.succeeded", "job.failed", "job.canceled")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
ALL_EVENTS = JOB_EVENTS + BATCH_EVENTS
EVENT_FOR_STATUS = {"running": "job.started", "succeeded": "job.succeeded",
                    "failed": "job.failed", "canceled": "job.canceled"}


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def validate_events(events: list[str] | None, param: str,
                    known: tuple[str, ...] = ALL_EVENTS) -> list[str]:
    if events is None:
        return list(known)
    if not events:
        raise InvalidRequest("Name at least one event.", param=param)
    unknown = [e for e in events if e not in known]
    if unknown:
        raise InvalidRequest(f"Unknown webhook events: {', '.join(unknown)}. Known: "
                             f"{', '.join(known)}.", param=param)
    return list(dict.fromkeys(events))


def check_url(url: str, param: str) -> str:
    check_target(url, allow_private=get_settings().webhook_allow_private_targets, param=param)
    return url


def default_secret(session: Session, project_id: str) -> str:
    project = session.get(Project, project_id)
    assert project is not None
    if project.webhook_secret is None:
        project.webhook_secret = new_secret()
        session.add(project)
        session.flush()
    return project.webhook_secret


def create_endpoint(session: Session, project_id: str, url: str, events: list[str] | None,
                    description: str | None) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(project_id=project_id, url=check_url(url, "url"),
                               events=validate_events(events, "events"),
                               secret=new_secret(), description=description)
    session.add(endpoint)
    session.flush()
    return endpoint


def get_endpoint(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.exec(select(WebhookEndpoint).where(
        col(WebhookEndpoint.id) == endpoint_id, col(WebhookEndpoint.project_id) == project_id,
        col(WebhookEndpoint.deleted_at).is_(None))).first()
    if endpoint is None:
        raise NotFound(f"No webhook endpoint '{endpoint_id}'.", param="endpoint_id")
    return endpoint


def list_endpoints(session: Session, project_id: str) -> list[WebhookEndpoint]:
    return list(session.exec(select(WebhookEndpoint).where(
        col(WebhookEndpoint.project_id) == project_id,
        col(WebhookEndpoint.deleted_at).is_(None)).order_by(col(WebhookEndpoint.created_at))))


def delete_endpoint(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = get_endpoint(session, project_id, endpoint_id)
    endpoint.deleted_at = utcnow()
    session.add(endpoint)
    session.flush()
    return endpoint


def rotate_secret(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = get_endpoint(session, project_id, endpoint_id)
    endpoint.secret = new_secret()
    session.add(endpoint)
    session.flush()
    return endpoint


def _job_payload(job: Job, images: list[Image]) -> dict[str, Any]:
    from shared.jobs import render_job  # jobs imports this module's validators

    # URLs, never image bytes, whatever response_format the job asked for.
    as_url = job.model_copy(update={"request": {**job.request, "response_format": "url"}})
    settings = get_settings()
    obj = render_job(as_url, images, get_storage(), settings.public_base_url(),
                     settings.url_expiry_seconds)
    data = obj.model_dump(mode="json", exclude_none=True)
    data["request"]["response_format"] = job.request.get("response_format")
    return data


def _record(session: Session, project_id: str, event: str, own_url: str | None,
            data: Callable[[], dict[str, Any]], job_id: str | None = None) -> list[str]:
    """Deliveries of one event: to ``own_url`` (the job's or batch's webhook, signed
    with the project's default secret) and to every enabled endpoint subscribed to
    it. ``data`` is only rendered when someone listens. Returns the delivery ids."""
    targets: list[tuple[str, str | None]] = [(own_url, None)] if own_url else []
    for endpoint in list_endpoints(session, project_id):
        if endpoint.disabled_at is None and event in endpoint.events:
            targets.append((endpoint.url, endpoint.id))
    if not targets:
        return []
    now = utcnow()
    payload = {"type": event, "timestamp": now.isoformat().replace("+00:00", "Z"),
               "data": data()}
    deliveries = [WebhookDelivery(project_id=project_id, endpoint_id=endpoint_id,
                                  job_id=job_id, url=url, event_type=event, payload=payload,
                                  next_attempt_at=now, dispatched_at=now)
                  for url, endpoint_id in targets]
    session.add_all(deliveries)
    session.flush()
    return [d.id for d in deliveries]


def record_job_event(session: Session, job: Job, images: list[Image]) -> list[str]:
    """Create the deliveries of this job's current status; returns their ids."""
    event = EVENT_FOR_STATUS.get(job.status)
    if event is None:
        return []
    own = job.webhook_url if event in (job.webhook_events or JOB_EVENTS) else None
    return _record(session, job.project_id, event, own, lambda: _job_payload(job, images),
                   job_id=job.id)


def record_batch_event(session: Session, batch: Any, event: str,
                       data: dict[str, Any]) -> list[str]:
    """Deliveries of a batch event: to the batch's own webhook_url and subscribed endpoints."""
    return _record(session, batch.project_id, event, batch.webhook_url, lambda: data)


def list_deliveries(session: Session, project_id: str, *, job_id: str | None,
                    endpoint_id: str | None, status: str | None, limit: int,
                    after: str | None) -> tuple[list[WebhookDelivery], bool]:
    query = select(WebhookDelivery).where(col(WebhookDelivery.project_id) == project_id)
    if job_id is not None:
        query = query.where(col(WebhookDelivery.job_id) == job_id)
    if endpoint_id is not None:
        query = query.where(col(WebhookDelivery.endpoint_id) == endpoint_id)
    if status is not None:
        query = query.where(col(WebhookDelivery.status) == status)
    if after is not None:
        query = query.where(col(WebhookDelivery.id) < after)
    rows = list(session.exec(query.order_by(col(WebhookDelivery.id).desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delivery_attempts(session: Session, delivery_id: str) -> list[WebhookAttempt]:
    return list(session.exec(select(WebhookAttempt).where(
        col(WebhookAttempt.delivery_id) == delivery_id).order_by(col(WebhookAttempt.number))))


def redeliver(session: Session, project_id: str, delivery_id: str) -> WebhookDelivery:
    delivery = session.exec(select(WebhookDelivery).where(
        col(WebhookDelivery.id) == delivery_id,
        col(WebhookDelivery.project_id) == project_id)).first()
    if delivery is None:
        raise NotFound(f"No delivery '{delivery_id}'.", param="delivery_id")
    now = utcnow()
    delivery.status = "pending"
    delivery.next_attempt_at = now
    delivery.dispatched_at = now
    delivery.lease_expires_at = None
    delivery.updated_at = now
    session.add(delivery)
    session.flush()
    return delivery
