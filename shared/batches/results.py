
from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from shared.batches.models import Batch
from shared.batches.views import _items_with_jobs, render_batch
from shared.core.broker import publish_deliveries
from shared.core.clock import utcnow
from shared.core.db import session_scope
from shared.core.events import publish_job_changed
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.files.service import create_file
from shared.jobs.service import images_by_job
from shared.jobs.views import render_result
from shared.webhooks.events import record_batch_event

FINAL_STATUS = {"in_progress": "completed", "cancelling": "cancelled", "expiring": "expired"}



def finalize(batch_id: str) -> None:
    """Write the output and error files, then the final status. Guarded: runs once."""
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        if batch is None:
            return
        final = FINAL_STATUS.get(batch.status)
        moved = session.execute(
            sa.update(Batch).where(col(Batch.id) == batch_id,
                                   col(Batch.status).in_(list(FINAL_STATUS)))
            .values(status="finalizing", finalizing_at=utcnow()))
        if final is None or moved.rowcount != 1:  # type: ignore[attr-defined]
            return
    _write_results(batch_id, final)



def refinalize(batch_id: str) -> None:
    """A finalizer died half-way: write the files again (the row keeps the old intent)."""
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status != "finalizing":
            return
        if batch.cancelling_at is not None:
            final = "cancelled"
        elif batch.expires_at is not None and batch.expires_at < utcnow():
            final = "expired"
        else:
            final = "completed"
        batch.finalizing_at = utcnow()
        session.add(batch)
    _write_results(batch_id, final)



def _write_results(batch_id: str, final: str) -> None:
    settings = get_settings()
    storage = get_storage()
    base_url = settings.public_base_url()
    out_lines: list[str] = []
    err_lines: list[str] = []
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        rows = _items_with_jobs(session, batch, sa.true(), None)
        images = images_by_job(session, batch.project_id,
                               [job.id for item, job in rows if item.status == "succeeded"
                                and job is not None])
        for item, job in rows:
            line: dict[str, Any] = {"id": item.id, "custom_id": item.custom_id,
                                    "response": None, "error": None}
            if item.status == "succeeded" and job is not None:
                body = render_result(job, images[job.id], storage, base_url,
                                     settings.batch_url_expiry_seconds)
                line["response"] = {"status_code": 200, "request_id": job.id,
                                    "body": body.model_dump(exclude_none=True)}
                out_lines.append(json.dumps(line))
                continue
            if item.status_code is not None:
                line["response"] = {"status_code": item.status_code,
                                    "request_id": item.job_id or item.id,
                                    "body": {"error": item.error}}
            else:
                line["error"] = item.error
            err_lines.append(json.dumps(line))
        now = utcnow()
        if out_lines:
            batch.output_file_id = create_file(
                session, storage, batch.project_id, f"{batch.id}_output.jsonl",
                "batch_output", ("\n".join(out_lines) + "\n").encode()).id
        if err_lines:
            batch.error_file_id = create_file(
                session, storage, batch.project_id, f"{batch.id}_error.jsonl",
                "batch_output", ("\n".join(err_lines) + "\n").encode()).id
        batch.status = final
        setattr(batch, {"completed": "completed_at", "cancelled": "cancelled_at",
                        "expired": "expired_at"}[final], now)
        session.add(batch)
        session.flush()
        deliveries = record_batch_event(session, batch, f"batch.{final}",
                                        render_batch(session, batch))
    publish_deliveries(deliveries)
    publish_job_changed(batch_id, final)
