"""Wire shapes of the audit trail (``GET /v1/admin/audit``)."""

from __future__ import annotations

from typing import Any, Literal

from shared.core.schemas import Schema


class AuditEventObject(Schema):
    """One admin action: who did what to which target, and when."""

    id: str
    """The event's id (``audit_...``), time-ordered: the list's cursor."""
    object: Literal["audit_event"] = "audit_event"
    """Always ``audit_event``."""
    at: int
    """When, Unix seconds."""
    actor: str
    """Who: ``admin`` (the admin API key), ``cli`` (the ``imagegen`` command on the
    server's database) or the id of the project key that acted (``key_...``)."""
    project: str | None = None
    """The name of the project the action concerns (null where none)."""
    project_id: str | None = None
    """Its id."""
    action: str
    """What: ``project.create``, ``limits.update``, ``budget.update``,
    ``quota.update``, ``retention.update``, ``key.create``, ``key.revoke``,
    ``job.delete``, ``batch.delete``."""
    target: str
    """The id of what it acted on (a project, key, job or batch)."""
    details: dict[str, Any]
    """What changed (``changes``: each field ``from`` and ``to``) and the names that
    help a reader; never a secret."""
