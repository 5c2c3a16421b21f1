"""Record admin actions and read them back.

``record`` only adds the row and flushes: it is written in the caller's transaction,
beside the change it describes. Details never hold a secret: known secret-bearing
fields are dropped and every string is redacted (``shared/core/redact.py``) before
it is stored, whatever a caller passes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from shared.audit.models import AuditEvent
from shared.core.clock import utcnow
from shared.core.pages import newest_first
from shared.core.redact import redact
from shared.projects.models import Project

# The actors that are not a project key.
ADMIN = "admin"  # the admin key (IMAGEGEN_ADMIN_API_KEY): one key, named, never shown
CLI = "cli"  # the imagegen command, writing on the server's database

# Fields whose value is a secret whatever it looks like: never stored.
_SECRET_FIELDS = frozenset(
    {"key", "plaintext", "secret", "key_hash", "webhook_secret", "password", "token"}
)


# A key's prefix (``sk-ig-pbbm``) is what lets an admin tell keys apart, and too
# short to be one: kept as it is (the redactor would take it for a key).
_PREFIX_FIELDS = frozenset({"prefix"})
_PREFIX_MOST = 16


def clean(value: Any) -> Any:
    """``value`` without secrets: secret-named fields dropped, strings redacted,
    anything not JSON made a string."""
    if isinstance(value, dict):
        return {
            str(k): v
            if str(k) in _PREFIX_FIELDS and isinstance(v, str) and len(v) <= _PREFIX_MOST
            else clean(v)
            for k, v in value.items()
            if str(k) not in _SECRET_FIELDS
        }
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return redact(str(value))


def record(
    session: Session,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
    *,
    project_id: str | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Record one admin action in the caller's transaction.

    ``actor``: ``ADMIN``, ``CLI`` or a project key's id (``principal.key_id``);
    ``action``: a dotted name (``project.update``, ``key.create``, ``job.delete``);
    ``target``: the id (or name) of what it acted on; ``project_id``: the project it
    concerns, for the list's filter (a project key's own project for its actions)."""
    event = AuditEvent(
        actor=actor,
        project_id=project_id,
        action=action,
        target=target,
        details=clean(details or {}),
        at=at or utcnow(),
    )
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session,
    *,
    limit: int,
    after: str | None = None,
    project_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
) -> tuple[list[AuditEvent], bool]:
    """A page of events, newest first, filtered by project, action and time."""
    query = select(AuditEvent)
    if project_id is not None:
        query = query.where(col(AuditEvent.project_id) == project_id)
    if action is not None:
        query = query.where(col(AuditEvent.action) == action)
    if since is not None:
        query = query.where(col(AuditEvent.at) >= since)
    return newest_first(session, query, col(AuditEvent.id), limit=limit, after=after)


def project_names(session: Session, events: list[AuditEvent]) -> dict[str, str]:
    """Project id -> name for the events' projects (one query)."""
    ids = {e.project_id for e in events if e.project_id}
    if not ids:
        return {}
    rows = session.exec(select(Project.id, Project.name).where(col(Project.id).in_(ids)))
    return dict(rows.all())
