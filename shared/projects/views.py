"""Rendering projects and keys (never a key itself: only its prefix)."""

from __future__ import annotations

from shared.core.clock import to_unix
from shared.projects.models import ApiKey, Project
from shared.projects.schemas import KeyObject, ProjectObject


def project_view(project: Project) -> ProjectObject:
    return ProjectObject(
        id=project.id,
        name=project.name,
        created_at=to_unix(project.created_at) or 0,
        key_requests_per_minute=project.key_requests_per_minute,
        images_per_day=project.images_per_day,
        jobs_in_flight=project.jobs_in_flight,
        daily_budget_usd=project.daily_budget_usd,
        monthly_budget_usd=project.monthly_budget_usd,
        storage_quota_bytes=project.storage_quota_bytes,
        image_retention_seconds=project.image_retention_seconds,
        file_retention_seconds=project.file_retention_seconds,
        job_retention_seconds=project.job_retention_seconds,
    )


def key_view(key: ApiKey, project: Project) -> KeyObject:
    return KeyObject(
        id=key.id,
        name=key.name,
        user=key.user,
        prefix=key.prefix,
        project=project.name,
        created_at=to_unix(key.created_at) or 0,
        last_used_at=to_unix(key.last_used_at),
        revoked_at=to_unix(key.revoked_at),
        daily_budget_usd=key.daily_budget_usd,
        monthly_budget_usd=key.monthly_budget_usd,
    )
