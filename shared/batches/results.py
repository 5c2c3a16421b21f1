"""Finalizing a batch: its output and error files, then its final status.

Two steps, each its own transaction in the worker: ``start_finalizing`` (the
guarded move to ``finalizing``, so one finalizer wins) and ``write_results``. A
finalizer that dies between them leaves the batch ``finalizing``; the sweeper
calls ``finalizing_intent`` and writes the files again.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from shared.batches.models import FINAL_STATUS, Batch, BatchStatus, ItemStatus
from shared.batches.views import items_with_jobs, render_batch
from shared.core.clock import utcnow
from shared.core.events import publish_changed
from shared.core.outbox import after_commit
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.files.service import create_file
from shared.jobs.service import images_by_job
from shared.jobs.views import render_result
from shared.retention.service import image_retention
from shared.webhooks.events import record_batch_event


def start_finalizing(session: Session, batch_id: str) -> BatchStatus | None:
    """Move the batch to ``finalizing``; returns the status it will end in, or None
    when another finalizer got there first (or it is not ready)."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        return None
    final = FINAL_STATUS.get(BatchStatus(batch.status))
    moved = session.execute(
        sa.update(Batch)
        .where(col(Batch.id) == batch_id, col(Batch.status).in_(list(FINAL_STATUS)))
        .values(status=BatchStatus.finalizing, finalizing_at=utcnow())
    )
    if final is None or moved.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return final


def finalizing_intent(session: Session, batch_id: str) -> BatchStatus | None:
    """A finalizer died half-way: the status the batch was ending in (from its
    timestamps), or None if it is not finalizing."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.status != BatchStatus.finalizing:
        return None
    if batch.cancelling_at is not None:
        final = BatchStatus.cancelled
    elif batch.expires_at is not None and batch.expires_at < utcnow():
        final = BatchStatus.expired
    else:
        final = BatchStatus.completed
    batch.finalizing_at = utcnow()
    session.add(batch)
    return final


def write_results(session: Session, batch_id: str, final: BatchStatus) -> None:
    """Write the output and error files (OpenAI's line format), then the final status."""
    settings = get_settings()
    storage = get_storage()
    base_url = settings.public_base_url()
    out_lines: list[str] = []
    err_lines: list[str] = []
    batch = session.get(Batch, batch_id)
    assert batch is not None
    rows = items_with_jobs(session, batch, sa.true(), None)
    images = images_by_job(
        session,
        batch.project_id,
        [job.id for item, job in rows if item.status == ItemStatus.succeeded and job is not None],
    )
    retention = image_retention(session, batch.project_id)
    for item, job in rows:
        line: dict[str, Any] = {
            "id": item.id,
            "custom_id": item.custom_id,
            "response": None,
            "error": None,
        }
        if item.status == ItemStatus.succeeded and job is not None:
            body = render_result(
                job,
                images[job.id],
                storage,
                base_url,
                settings.batch_url_expiry_seconds,
                retention_seconds=retention,
            )
            line["response"] = {
                "status_code": 200,
                "request_id": job.id,
                "body": body.model_dump(exclude_none=True),
            }
            out_lines.append(json.dumps(line))
            continue
        if item.status_code is not None:
            line["response"] = {
                "status_code": item.status_code,
                "request_id": item.job_id or item.id,
                "body": {"error": item.error},
            }
        else:
            line["error"] = item.error
        err_lines.append(json.dumps(line))
    now = utcnow()
    if out_lines:
        batch.output_file_id = create_file(
            session,
            storage,
            batch.project_id,
            f"{batch.id}_output.jsonl",
            "batch_output",
            ("\n".join(out_lines) + "\n").encode(),
            expires_after=batch.output_expires_after_seconds,
        ).id
    if err_lines:
        batch.error_file_id = create_file(
            session,
            storage,
            batch.project_id,
            f"{batch.id}_error.jsonl",
            "batch_output",
            ("\n".join(err_lines) + "\n").encode(),
            expires_after=batch.output_expires_after_seconds,
        ).id
    batch.status = final
    setattr(
        batch,
        {
            BatchStatus.completed: "completed_at",
            BatchStatus.cancelled: "cancelled_at",
            BatchStatus.expired: "expired_at",
        }[final],
        now,
    )
    session.add(batch)
    session.flush()
    record_batch_event(
        session, batch, f"batch.{final}", render_batch(session, batch).model_dump(mode="json")
    )
    after_commit(session, lambda: publish_changed(batch_id, final))
