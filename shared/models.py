"""Every table, for Alembic (``migrations/env.py``) and the migrations that
imported column types from here. Code imports a table from its domain."""

from __future__ import annotations

from shared.audit.models import AuditEvent
from shared.batches.models import Batch, BatchItem
from shared.core.columns import UTCDateTime
from shared.files.models import File
from shared.idempotency.models import IdempotencyKey
from shared.jobs.models import Image, Job
from shared.projects.models import ApiKey, Project
from shared.traces.models import Call
from shared.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

__all__ = [
    "ApiKey",
    "AuditEvent",
    "Batch",
    "BatchItem",
    "Call",
    "File",
    "IdempotencyKey",
    "Image",
    "Job",
    "Project",
    "UTCDateTime",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
]
