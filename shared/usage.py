"""Usage per project, by UTC day and model: jobs by status, images, pixels, the
provider's own usage figures (tokens, for gpt-image models) and the cost in USD."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import Field
from sqlmodel import Session, col

from shared.core.errors import InvalidRequest
from shared.core.schemas import Schema
from shared.jobs.models import Image, Job, JobStatus
from shared.projects.schemas import BudgetStatus

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
