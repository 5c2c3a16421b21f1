"""Retention settings of a project, and whether a stored image is past its life."""

from __future__ import annotations

import re
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col

from shared.audit.service import record
from shared.core.clock import utcnow
from shared.core.errors import InvalidRequest
from shared.core.invalidation import invalidate
from shared.core.outbox import after_commit
from shared.jobs.models import Image, Job
from shared.projects.models import Project
from shared.projects.schemas import Retention
from shared.projects.service import PRINCIPALS_CACHE, get_project
from shared.retention.policy import RETENTION_MOST, image_ends_at

RETENTIONS = ("image_retention_seconds", "file_retention_seconds", "job_retention_seconds")
_IMAGE_KEY = re.compile(r"[^/]+/(?P<job>[^/]+)/(?P<index>\d+)\.[a-z0-9]+")


def set_retention(session: Session, name: str, actor: str, **retention: int | None) -> Project:
    """Change the given retentions (seconds; null: forever), recorded in the audit
    trail as ``retention.update`` with what they were and are."""
    for field, value in retention.items():
        if field not in RETENTIONS:
            raise InvalidRequest(f"Unknown retention '{field}'.", param=field)
        if value is not None and not 60 <= value <= RETENTION_MOST:
            raise InvalidRequest(
                f"'{field}' must be at least 60 seconds (null: forever).", param=field
            )
    project = get_project(session, name)
    before = {field: getattr(project, field) for field in retention}
    for field, value in retention.items():
        setattr(project, field, value)
    session.add(project)
    session.flush()
    if retention:
        record(
            session,
            actor,
            "retention.update",
            project.id,  # as every project event: the id, the name in details
            {
                "project": project.name,
                "changes": {f: {"from": before[f], "to": v} for f, v in retention.items()},
            },
            project_id=project.id,
        )
    # Principals carry the image retention (the cap on Image-Expires-After).
    after_commit(session, lambda: invalidate(PRINCIPALS_CACHE))
    return project


def retention_of(session: Session, project_id: str) -> Retention:
    """A project's retention settings, as ``GET /v1/usage`` and the console show them."""
    project = session.get(Project, project_id)
    return Retention.model_validate(
        {field: getattr(project, field) if project else None for field in RETENTIONS}
    )


def image_retention(session: Session, project_id: str) -> int | None:
    """A project's image retention in seconds (None: forever), for a view rendering
    its images where no principal carries it (a batch's pages and output file, a
    webhook's payload): an image past it is expired, a URL capped at it."""
    return session.execute(
        sa.select(col(Project.image_retention_seconds)).where(col(Project.id) == project_id)
    ).scalar()


def image_expired(session: Session, key: str, now: datetime | None = None) -> bool:
    """Whether ``key`` is an image past its life (marked by the purge, or past its
    time already); False for anything else (an input, a file, a key of no image)."""
    match = _IMAGE_KEY.fullmatch(key)
    if match is None:
        return False
    row = session.execute(
        sa.select(
            col(Image.expired_at),
            col(Image.created_at),
            col(Job.images_expire_at),
            col(Project.image_retention_seconds),
        )
        .join(Job, col(Job.id) == col(Image.job_id))
        .join(Project, col(Project.id) == col(Image.project_id))
        .where(
            col(Image.job_id) == match.group("job"),
            col(Image.index) == int(match.group("index")),
            col(Image.storage_key) == key,
        )
    ).first()
    if row is None:
        return False
    expired_at, created_at, job_ends, retention = row
    if expired_at is not None:
        return True
    ends = image_ends_at(job_ends, created_at, retention)
    return ends is not None and ends <= (now or utcnow())
