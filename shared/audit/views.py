"""Rendering audit events."""

from __future__ import annotations

from shared.audit.models import AuditEvent
from shared.audit.schemas import AuditEventObject
from shared.core.clock import to_unix


def event_view(event: AuditEvent, project_names: dict[str, str]) -> AuditEventObject:
    """``project_names``: project id -> name, for the events' projects."""
    return AuditEventObject(
        id=event.id,
        at=to_unix(event.at) or 0,
        actor=event.actor,
        project=project_names.get(event.project_id) if event.project_id else None,
        project_id=event.project_id,
        action=event.action,
        target=event.target,
        details=event.details,
    )
