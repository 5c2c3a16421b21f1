
from __future__ import annotations

from typing import Any

from shared.core.clock import to_unix
from shared.projects.models import ApiKey, Project


def project_view(project: Project) -> dict[str, Any]:
    return {"id": project.id, "object": "project", "name": project.name,
            "created_at": to_unix(project.created_at),
            "key_requests_per_minute": project.key_requests_per_minute,
            "images_per_day": project.images_per_day,
            "jobs_in_flight": project.jobs_in_flight}



def key_view(key: ApiKey, project: Project) -> dict[str, Any]:
    return {"id": key.id, "object": "api_key", "name": key.name, "user": key.user,
            "prefix": key.prefix, "project": project.name,
            "created_at": to_unix(key.created_at), "last_used_at": to_unix(key.last_used_at),
            "revoked_at": to_unix(key.revoked_at)}
