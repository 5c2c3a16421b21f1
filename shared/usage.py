"""Usage per project, by UTC day and model: jobs by status, images, pixels, the
provider's own usage figures (tokens, for gpt-image models) and the cost in USD;
and the bytes a project keeps stored (``storage_bytes``: its images, edit inputs and
files), summed from the rows that own them."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import Field
from sqlmodel import Session, col

from shared.core.errors import InvalidRequest
from shared.core.schemas import Schema
from shared.files.models import File
from shared.jobs.models import Image, Job, JobStatus
from shared.projects.schemas import BudgetStatus, Retention

MAX_DAYS = 92


class UsageBucket(Schema):
    """One day and model."""

    date: str
    """The UTC day, ``YYYY-MM-DD``."""
    model: str
    """The model."""
    jobs: dict[str, int]
    """Jobs created that day, by status."""
    images: int
    """Images made."""
    pixels: int
    """Pixels made (width times height, summed)."""
    provider_usage: dict[str, int]
    """The providers' own figures (tokens), summed."""
    cost_usd: float
    """What the jobs cost in USD, by each serving model's ``price`` (0 where none)."""


class UsageTotals(Schema):
    """The sums over the whole report."""

    jobs: int
    """Jobs created."""
    images: int
    """Images made."""
    pixels: int
    """Pixels made."""
    cost_usd: float
    """What it cost in USD."""


class StorageUsage(Schema):
    """What the project keeps stored now, in bytes, by kind."""

    images_bytes: int
    """Its images not expired, of jobs not deleted."""
    inputs_bytes: int
    """Its edits' and variations' uploaded images and masks, kept under their jobs
    until their images expire (an edit that made none: its project's image
    retention after it ended) or the job is deleted."""
    files_bytes: int
    """Its Files API files not deleted (batch inputs, outputs and errors included)."""


class UsageReport(Schema):
    """``GET /v1/usage``: the project's jobs and images per day and model."""

    object: Literal["usage"] = "usage"
    """Always ``usage``."""
    project: str
    """The project's name."""
    start_date: str
    """The first UTC day, ``YYYY-MM-DD``."""
    end_date: str
    """The last UTC day, included."""
    data: list[UsageBucket]
    """One bucket per day and model that had jobs, oldest first."""
    totals: UsageTotals
    """The sums over every bucket."""
    budgets: list[BudgetStatus] = Field(default_factory=list)
    """The budgets as they stand now, whatever the report's days: the project's day
    and month (``budget_usd`` null where it has none), then the calling key's own
    where it has them."""
    storage_bytes: int = 0
    """The bytes the project keeps stored now, whatever the report's days: images,
    edit inputs and files (``storage`` by kind)."""
    storage: StorageUsage | None = None
    """``storage_bytes`` by kind."""
    storage_quota_bytes: int | None = None
    """The project's storage quota: reached, new work is refused with 429
    ``storage_quota_exceeded``; null for none."""
    retention: Retention | None = None
    """How long the project keeps its images, files and job rows (null: forever)."""


def _storage_queries(project_id: str | None) -> list[tuple[int, sa.Select[Any]]]:
    """The sums of a project's stored bytes, each with its sign (every
    project's, by project, when ``project_id`` is None): its live images (an index
    alone: ix_image_live_project_id_size_bytes), less those of its deleted jobs (kept
    as rows, tombstones; found by a partial index, they are few), its edits' inputs
    until their images expire (the purge deletes them together,
    shared/retention/purge.py), and its files not deleted."""
    live = sa.select(
        col(Image.project_id), sa.func.coalesce(sa.func.sum(col(Image.size_bytes)), 0)
    ).where(col(Image.expired_at).is_(None))
    deleted = (
        sa.select(col(Job.project_id), sa.func.coalesce(sa.func.sum(col(Image.size_bytes)), 0))
        .join(Image, col(Image.job_id) == col(Job.id))
        .where(col(Job.deleted_at).is_not(None), col(Image.expired_at).is_(None))
    )
    expired = (
        sa.select(sa.literal(1))
        .where(col(Image.job_id) == col(Job.id), col(Image.expired_at).is_not(None))
        .exists()
    )
    inputs = sa.select(
        col(Job.project_id), sa.func.coalesce(sa.func.sum(col(Job.input_bytes)), 0)
    ).where(col(Job.input_bytes).is_not(None), col(Job.deleted_at).is_(None), ~expired)
    files = sa.select(
        col(File.project_id), sa.func.coalesce(sa.func.sum(col(File.bytes)), 0)
    ).where(col(File.deleted_at).is_(None))
    owners = [col(Image.project_id), col(Job.project_id), col(Job.project_id), col(File.project_id)]
    queries: list[sa.Select[Any]] = [live, deleted, inputs, files]
    if project_id is not None:
        queries = [q.where(o == project_id) for q, o in zip(queries, owners, strict=True)]
    grouped = [q.group_by(o) for q, o in zip(queries, owners, strict=True)]
    signs = [1, -1, 1, 1]  # the deleted jobs' images are taken off the live ones
    return list(zip(signs, grouped, strict=True))


def storage_usage(session: Session, project_id: str) -> StorageUsage:
    """The bytes ``project_id`` keeps stored now, exact (four indexed sums)."""
    sums = []
    for sign, query in _storage_queries(project_id):
        row = session.execute(query).first()
        sums.append(sign * int(row[1]) if row is not None else 0)
    return StorageUsage(images_bytes=sums[0] + sums[1], inputs_bytes=sums[2], files_bytes=sums[3])


def storage_bytes(session: Session, project_id: str) -> int:
    usage = storage_usage(session, project_id)
    return usage.images_bytes + usage.inputs_bytes + usage.files_bytes


def storage_bytes_by_project(session: Session) -> dict[str, int]:
    """Every project's stored bytes (those storing nothing left out): the metrics'
    gauge, one grouped sum per kind."""
    total: dict[str, int] = defaultdict(int)
    for sign, query in _storage_queries(None):
        for project_id, value in session.execute(query):
            total[str(project_id)] += sign * int(value)
    return dict(total)


def usage_report(
    session: Session, project_id: str, project_name: str, start: date, end: date
) -> UsageReport:
    if end < start:
        raise InvalidRequest("'end_date' is before 'start_date'.", param="end_date")
    if (end - start).days >= MAX_DAYS:
        raise InvalidRequest(f"At most {MAX_DAYS} days per report.", param="start_date")
    lo = datetime.combine(start, time.min, tzinfo=UTC)
    hi = datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC)
    images = (
        sa.select(
            col(Image.job_id),
            sa.func.count().label("images"),
            sa.func.sum(col(Image.width) * col(Image.height)).label("pixels"),
        )
        .group_by(col(Image.job_id))
        .subquery()
    )
    rows = session.execute(
        sa.select(
            col(Job.created_at),
            col(Job.model),
            col(Job.status),
            col(Job.usage),
            col(Job.cost_usd),
            images.c.images,
            images.c.pixels,
        )
        .outerjoin(images, images.c.job_id == col(Job.id))
        .where(
            col(Job.project_id) == project_id, col(Job.created_at) >= lo, col(Job.created_at) < hi
        )
    ).all()
    buckets: dict[tuple[str, str], dict[str, Any]] = {}
    for created_at, model, status, usage, cost_usd, n_images, pixels in rows:
        key = (created_at.astimezone(UTC).date().isoformat(), model)
        bucket = buckets.setdefault(
            key,
            {
                "date": key[0],
                "model": model,
                "jobs": {s.value: 0 for s in JobStatus},
                "images": 0,
                "pixels": 0,
                "provider_usage": defaultdict(int),
                "cost_usd": 0.0,
            },
        )
        bucket["jobs"][status] += 1
        bucket["images"] += int(n_images or 0)
        bucket["pixels"] += int(pixels or 0)
        bucket["cost_usd"] += float(cost_usd or 0.0)
        for name, value in (usage or {}).items():
            if isinstance(value, int):
                bucket["provider_usage"][name] += value
    data = [{**b, "provider_usage": dict(b["provider_usage"])} for _, b in sorted(buckets.items())]
    totals = {
        "jobs": sum(sum(b["jobs"].values()) for b in data),
        "images": sum(b["images"] for b in data),
        "pixels": sum(b["pixels"] for b in data),
        "cost_usd": sum(b["cost_usd"] for b in data),
    }
    return UsageReport(
        project=project_name,
        start_date=start.isoformat(),
        end_date=end.isoformat(),
        data=[UsageBucket(**b) for b in data],
        totals=UsageTotals(**totals),
    )
