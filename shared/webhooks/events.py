from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlmodel import Session

from shared.batches.models import Batch
from shared.core.broker import publish_deliveries
from shared.core.clock import utcnow
from shared.core.outbox import after_commit
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.jobs.models import Image, Job, JobStatus
from shared.jobs.views import render_job
from shared.retention.service import image_retention
from shared.webhooks.models import JOB_EVENTS, WebhookDelivery
from shared.webhooks.service import subscriptions

EVENT_FOR_STATUS: dict[JobStatus, str] = {
    JobStatus.running: "job.started",
    JobStatus.succeeded: "job.succeeded",
    JobStatus.failed: "job.failed",
    JobStatus.canceled: "job.canceled",
}


def _job_payload(session: Session, job: Job, images: list[Image]) -> dict[str, Any]:
    # URLs, never image bytes, whatever response_format the job asked for; a URL
    # never outlives its image (the project's image retention).
    as_url = job.model_copy(update={"request": {**job.request, "response_format": "url"}})
    settings = get_settings()
    obj = render_job(
        as_url,
        images,
        get_storage(),
        settings.public_base_url(),
        settings.url_expiry_seconds,
        retention_seconds=image_retention(session, job.project_id) if images else None,
    )
    data = obj.model_dump(mode="json", exclude_none=True)
    data["request"]["response_format"] = job.request.get("response_format")
    return data


def _record(
    session: Session,
    project_id: str,
    event: str,
    own_url: str | None,
    data: Callable[[], dict[str, Any]],
    job_id: str | None = None,
) -> None:
    """Deliveries of one event: to ``own_url`` (the job's or batch's webhook, signed
    with the project's default secret) and to every enabled endpoint subscribed to
    it. ``data`` is only rendered when someone listens. They are sent after commit."""
    targets: list[tuple[str, str | None]] = [(own_url, None)] if own_url else []
    for sub in subscriptions(session, project_id):
        if event in sub.events:
            targets.append((sub.url, sub.endpoint_id))
    if not targets:
        return
    now = utcnow()
    payload = {"type": event, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": data()}
    deliveries = [
        WebhookDelivery(
            project_id=project_id,
            endpoint_id=endpoint_id,
            job_id=job_id,
            url=url,
            event_type=event,
            payload=payload,
            next_attempt_at=now,
            dispatched_at=now,
        )
        for url, endpoint_id in targets
    ]
    session.add_all(deliveries)
    session.flush()
    ids = [d.id for d in deliveries]
    after_commit(session, lambda: publish_deliveries(ids))


def record_job_event(session: Session, job: Job, images: list[Image]) -> None:
    """Create the deliveries of this job's current status, sent after commit."""
    event = EVENT_FOR_STATUS.get(JobStatus(job.status))
    if event is None:
        return
    own = job.webhook_url if event in (job.webhook_events or JOB_EVENTS) else None
    _record(
        session,
        job.project_id,
        event,
        own,
        lambda: _job_payload(session, job, images),
        job_id=job.id,
    )


def record_batch_event(session: Session, batch: Batch, event: str, data: dict[str, Any]) -> None:
    """Deliveries of a batch event: to the batch's own webhook_url and subscribed endpoints."""
    _record(session, batch.project_id, event, batch.webhook_url, lambda: data)
