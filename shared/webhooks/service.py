"""Webhook endpoints, secrets, and turning job events into deliveries.

Deliveries are written in the same transaction as the job transition that causes
them (an outbox): an event is never lost between the two, and a worker restart
only delays it. The payload is fixed when the event happens, so every retry
carries the same body under the same ``webhook-id``.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.core.broker import publish_deliveries
from shared.core.clock import utcnow
from shared.core.errors import InvalidRequest, NotFound, UnresolvableTarget, UnsafeTarget
from shared.core.invalidation import InvalidatedCache, invalidate
from shared.core.outbox import after_commit
from shared.core.pages import newest_first, owned
from shared.core.settings import get_settings
from shared.jobs.models import Job
from shared.projects.models import Project
from shared.webhooks.models import (
    ALL_EVENTS,
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from shared.webhooks.targets import check_target


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def validate_events(
    events: list[str] | None, param: str, known: tuple[str, ...] = ALL_EVENTS
) -> list[str]:
    if events is None:
        return list(known)
    if not events:
        raise InvalidRequest("Name at least one event.", param=param)
    unknown = [e for e in events if e not in known]
    if unknown:
        raise InvalidRequest(
            f"Unknown webhook events: {', '.join(unknown)}. Known: {', '.join(known)}.", param=param
        )
    return list(dict.fromkeys(events))


def check_url(url: str, param: str) -> str:
    """A webhook target named in a request, checked now: refused as the request's 400."""
    try:
        check_target(url, allow_private=get_settings().webhook_allow_private_targets, param=param)
    except (UnsafeTarget, UnresolvableTarget) as exc:
        raise InvalidRequest(exc.message, param=param) from None
    return url


def default_secret(session: Session, project_id: str) -> str:
    project = session.get(Project, project_id)
    assert project is not None
    if project.webhook_secret is None:
        project.webhook_secret = new_secret()
        session.add(project)
        session.flush()
    return project.webhook_secret


def create_endpoint(
    session: Session, project_id: str, url: str, events: list[str] | None, description: str | None
) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(
        project_id=project_id,
        url=check_url(url, "url"),
        events=validate_events(events, "events"),
        secret=new_secret(),
        description=description,
    )
    session.add(endpoint)
    session.flush()
    _subscriptions_changed(session, project_id)
    return endpoint


def get_endpoint(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    return owned(
        session,
        WebhookEndpoint,
        project_id,
        endpoint_id,
        NotFound(f"No webhook endpoint '{endpoint_id}'.", param="endpoint_id"),
    )


def list_endpoints(session: Session, project_id: str) -> list[WebhookEndpoint]:
    return list(
        session.exec(
            select(WebhookEndpoint)
            .where(
                col(WebhookEndpoint.project_id) == project_id,
                col(WebhookEndpoint.deleted_at).is_(None),
            )
            .order_by(col(WebhookEndpoint.created_at))
        )
    )


def delete_endpoint(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = get_endpoint(session, project_id, endpoint_id)
    endpoint.deleted_at = utcnow()
    session.add(endpoint)
    session.flush()
    _subscriptions_changed(session, project_id)
    return endpoint


def disable_endpoint(session: Session, project_id: str, endpoint_id: str, reason: str) -> None:
    session.execute(
        sa.update(WebhookEndpoint)
        .where(col(WebhookEndpoint.id) == endpoint_id, col(WebhookEndpoint.disabled_at).is_(None))
        .values(disabled_at=utcnow(), disabled_reason=reason)
    )
    _subscriptions_changed(session, project_id)


@dataclass(frozen=True)
class Subscription:
    """An enabled endpoint and the events it takes."""

    endpoint_id: str
    url: str
    events: frozenset[str]


# Each project's subscriptions, cached per process: a job's events are recorded
# only when someone listens, and finding out must not cost a query per event.
SUBSCRIPTIONS: InvalidatedCache[list[Subscription]] = InvalidatedCache("subscriptions")


def subscriptions(session: Session, project_id: str) -> list[Subscription]:
    def load() -> list[Subscription]:
        return [
            Subscription(e.id, e.url, frozenset(e.events))
            for e in list_endpoints(session, project_id)
            if e.disabled_at is None
        ]

    return SUBSCRIPTIONS.get(project_id, load)


def _subscriptions_changed(session: Session, project_id: str) -> None:
    after_commit(session, lambda: invalidate(SUBSCRIPTIONS.name, project_id))


def rotate_secret(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = get_endpoint(session, project_id, endpoint_id)
    endpoint.secret = new_secret()
    session.add(endpoint)
    session.flush()
    return endpoint


def list_deliveries(
    session: Session,
    project_id: str,
    *,
    job_id: str | None,
    endpoint_id: str | None,
    status: str | None,
    limit: int,
    after: str | None,
) -> tuple[list[WebhookDelivery], bool]:
    query = select(WebhookDelivery).where(
        col(WebhookDelivery.project_id) == project_id, ~_of_deleted_job()
    )
    if job_id is not None:
        query = query.where(col(WebhookDelivery.job_id) == job_id)
    if endpoint_id is not None:
        query = query.where(col(WebhookDelivery.endpoint_id) == endpoint_id)
    if status is not None:
        query = query.where(col(WebhookDelivery.status) == status)
    return newest_first(session, query, col(WebhookDelivery.id), limit=limit, after=after)


def _of_deleted_job() -> sa.Exists:
    """A delivery about a job deleted since (its payload is the job: its request,
    its images' links): not listed, not redelivered."""
    return (
        sa.select(sa.literal(1))
        .where(col(Job.id) == col(WebhookDelivery.job_id), col(Job.deleted_at).is_not(None))
        .exists()
    )


def stop_job_deliveries(session: Session, job_id: str) -> int:
    """A deleted job's deliveries still pending are not sent again: failed, with
    ``job deleted`` as their error (an attempt under way still records its end).
    Returns the deliveries stopped."""
    result = session.execute(
        sa.update(WebhookDelivery)
        .where(
            col(WebhookDelivery.job_id) == job_id,
            col(WebhookDelivery.status) == DeliveryStatus.pending,
        )
        .values(status=DeliveryStatus.failed, last_error="job deleted", updated_at=utcnow())
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def delivery_attempts(session: Session, delivery_id: str) -> list[WebhookAttempt]:
    return list(
        session.exec(
            select(WebhookAttempt)
            .where(col(WebhookAttempt.delivery_id) == delivery_id)
            .order_by(col(WebhookAttempt.number))
        )
    )


def deliveries_due(session: Session) -> int:
    """Deliveries of every project due now or being attempted: the webhooks queue's
    work (an attempt keeps its due time until it ends), for the operator's gauges
    (metrics), not any project's view. Counted on ``ix_delivery_due``."""
    return int(
        session.execute(
            sa.select(sa.func.count())
            .select_from(WebhookDelivery)
            .where(
                col(WebhookDelivery.status) == DeliveryStatus.pending,
                col(WebhookDelivery.next_attempt_at) <= utcnow(),
            )
        ).scalar_one()
    )


def redeliver(session: Session, project_id: str, delivery_id: str) -> WebhookDelivery:
    delivery = owned(
        session,
        WebhookDelivery,
        project_id,
        delivery_id,
        NotFound(f"No delivery '{delivery_id}'.", param="delivery_id"),
    )
    if session.execute(
        sa.select(_of_deleted_job()).where(col(WebhookDelivery.id) == delivery_id)
    ).scalar():
        raise NotFound(f"No delivery '{delivery_id}'.", param="delivery_id")
    now = utcnow()
    delivery.status = DeliveryStatus.pending
    delivery.next_attempt_at = now
    delivery.dispatched_at = now
    delivery.lease_expires_at = None
    delivery.updated_at = now
    session.add(delivery)
    session.flush()
    after_commit(session, lambda: publish_deliveries([delivery_id]))
    return delivery


@dataclass(frozen=True)
class Webhook:
    """A per-job webhook: where, and for which events."""

    url: str
    events: list[str]


def webhook_of(req: Any, param_prefix: str = "") -> Webhook | None:
    """A per-job webhook from request fields, its target checked now."""
    from shared.webhooks.service import check_url, validate_events

    if req.webhook_url is None:
        if req.webhook_events is not None:
            raise InvalidRequest(
                "'webhook_events' needs 'webhook_url'.", param=param_prefix + "webhook_events"
            )
        return None
    from shared.webhooks.models import JOB_EVENTS

    return Webhook(
        url=check_url(req.webhook_url, param_prefix + "webhook_url"),
        events=validate_events(req.webhook_events, param_prefix + "webhook_events", JOB_EVENTS),
    )
