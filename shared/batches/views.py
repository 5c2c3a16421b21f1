"""Rendering batches and their lines."""

from __future__ import annotations

from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.batches.models import Batch, BatchItem, BatchStatus, ItemStatus
from shared.batches.schemas import (
    BatchErrors,
    BatchItemObject,
    BatchItemPage,
    BatchObject,
    ItemResponse,
    RequestCounts,
)
from shared.core.clock import to_unix
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.jobs.models import Job
from shared.jobs.service import images_by_job
from shared.jobs.views import render_result
from shared.retention.service import image_retention


def request_counts(session: Session, batch: Batch) -> RequestCounts:
    counts: Counter[str] = Counter(
        dict(
            session.execute(  # type: ignore[arg-type]
                sa.select(col(BatchItem.status), sa.func.count())
                .where(col(BatchItem.batch_id) == batch.id)
                .group_by(col(BatchItem.status))
            ).all()
        )
    )
    return RequestCounts(
        total=batch.total,
        completed=counts[ItemStatus.succeeded],
        failed=counts[ItemStatus.failed] + counts[ItemStatus.canceled],
    )


def render_batch(session: Session, batch: Batch) -> BatchObject:
    status = BatchStatus.finalizing if batch.status == BatchStatus.expiring else batch.status
    return BatchObject(
        id=batch.id,
        endpoint=batch.endpoint,
        errors=BatchErrors(data=batch.errors) if batch.errors else None,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=BatchStatus(status),
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=to_unix(batch.created_at) or 0,
        in_progress_at=to_unix(batch.in_progress_at),
        expires_at=to_unix(batch.expires_at),
        finalizing_at=to_unix(batch.finalizing_at),
        completed_at=to_unix(batch.completed_at),
        failed_at=to_unix(batch.failed_at),
        expired_at=to_unix(batch.expired_at),
        cancelling_at=to_unix(batch.cancelling_at),
        cancelled_at=to_unix(batch.cancelled_at),
        request_counts=request_counts(session, batch),
        metadata=batch.batch_metadata,
        cost_usd=batch_cost(session, batch),
    )


def batch_cost(session: Session, batch: Batch) -> float | None:
    """The sum of its jobs' costs (None while none has one)."""
    cost = session.execute(
        sa.select(sa.func.sum(col(Job.cost_usd))).where(
            col(Job.project_id) == batch.project_id, col(Job.batch_id) == batch.id
        )
    ).scalar()
    return None if cost is None else float(cost)


def items_with_jobs(
    session: Session, batch: Batch, where: Any, limit: int | None
) -> list[tuple[BatchItem, Job | None]]:
    """The batch's lines in order, each with its job, in one query."""
    query = (
        select(BatchItem, Job)
        .join(Job, col(Job.id) == col(BatchItem.job_id), isouter=True)
        .where(col(BatchItem.batch_id) == batch.id, where)
        .order_by(col(BatchItem.line))
    )
    if limit is not None:
        query = query.limit(limit)
    return [(item, job) for item, job in session.exec(query)]


def list_items(session: Session, batch: Batch, *, limit: int, after: int | None) -> BatchItemPage:
    """A page of lines with their results (fresh URLs), by line number."""
    settings = get_settings()
    after_clause = col(BatchItem.line) > after if after is not None else sa.true()
    rows = items_with_jobs(session, batch, after_clause, limit + 1)
    images = images_by_job(
        session,
        batch.project_id,
        [
            job.id
            for item, job in rows[:limit]
            if item.status == ItemStatus.succeeded and job is not None
        ],
    )
    retention = image_retention(session, batch.project_id)
    page = []
    for item, job in rows[:limit]:
        response = None
        if item.status == ItemStatus.succeeded and job is not None:
            body = render_result(
                job,
                images[job.id],
                get_storage(),
                settings.public_base_url(),
                settings.url_expiry_seconds,
                retention_seconds=retention,
            )
            response = ItemResponse(status_code=200, body=body.model_dump(exclude_none=True))
        elif item.status_code is not None:
            response = ItemResponse(status_code=item.status_code, body={"error": item.error})
        page.append(
            BatchItemObject(
                id=item.id,
                custom_id=item.custom_id,
                line=item.line,
                prompt=_prompt(item.body),
                status=ItemStatus(item.status),
                job_id=item.job_id,
                response=response,
                error=item.error,
            )
        )
    return BatchItemPage(
        data=page,
        has_more=len(rows) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        last_line=page[-1].line if page else None,
    )


def _prompt(body: dict[str, Any]) -> str | None:
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else None
