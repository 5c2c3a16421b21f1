"""Batches: OpenAI's Batch API over a JSONL file, and a native JSON batch.

A batch's lines become items; items become ordinary jobs on the batch queue a
few at a time (``pump``: at most ``batch_max_in_flight`` per project), so a
50,000-line batch never floods the broker or starves other projects' sync
requests. Every step is a guarded transition in SQL: a restart of any process
resumes the batch (the sweeper pumps it), an item's job is created once, and a
job runs to completion once, so each line gets exactly one result. Heavy steps
(validating the input, pumping, finalizing) run in the worker: a request only
records its change and enqueues the step.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.audit.service import record
from shared.batches.input import (
    ENDPOINTS,
    MAX_CUSTOM_ID_CHARS,
    MAX_LINES,
    check_metadata,
    parse_input,
)
from shared.batches.models import (
    BATCH_TRANSITIONS,
    PUMPED,
    TERMINAL,
    Batch,
    BatchItem,
    BatchStatus,
    ItemStatus,
)
from shared.batches.pump import DEADLINE_FIELD, stop_pending
from shared.batches.views import render_batch
from shared.core.broker import publish_batch_pump, publish_batch_validation
from shared.core.clock import utcnow
from shared.core.errors import Conflict, InvalidRequest, InvalidValue, NotFound, quoted
from shared.core.events import publish_changed
from shared.core.ids import new_id
from shared.core.outbox import after_commit
from shared.core.pages import newest_first, owned
from shared.core.schemas import Deleted
from shared.core.storage import Storage, get_storage
from shared.files.models import File
from shared.files.service import get_file
from shared.jobs import lifecycle
from shared.jobs.models import Image, Job
from shared.jobs.service import cancel_after as parse_cancel_after
from shared.jobs.service import job_prefix
from shared.projects.service import Principal
from shared.retention.purge import job_object_keys
from shared.webhooks.events import record_batch_event

# --- creating ----------------------------------------------------------------------


def create_openai_batch(
    session: Session,
    principal: Principal,
    *,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    output_expires_after_seconds: int | None = None,
) -> Batch:
    """Record the batch; the worker validates its input file (enqueued after commit).
    ``output_expires_after_seconds``: its output and error files' life."""
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"Unsupported endpoint '{quoted(endpoint)}': this service batches "
            f"{' and '.join(repr(e) for e in ENDPOINTS)}.",
            param="endpoint",
        )
    if completion_window != "24h":
        raise InvalidRequest("completion_window must be '24h'.", param="completion_window")
    check_metadata(metadata)
    file = get_file(session, principal.project_id, input_file_id)
    if file.purpose != "batch":
        raise InvalidRequest(
            f"File '{quoted(input_file_id)}' has purpose '{file.purpose}', not 'batch'.",
            param="input_file_id",
        )
    now = utcnow()
    batch = Batch(
        project_id=principal.project_id,
        key_id=principal.key_id,
        input_file_id=file.id,
        endpoint=endpoint,
        completion_window=completion_window,
        batch_metadata=metadata,
        created_at=now,
        expires_at=now + timedelta(hours=24),
        output_expires_after_seconds=output_expires_after_seconds,
    )
    session.add(batch)
    session.flush()
    batch_id = batch.id
    after_commit(session, lambda: publish_batch_validation(batch_id))  # if lost: the sweeper
    return batch


def create_native_batch(
    session: Session,
    principal: Principal,
    requests: list[dict[str, Any]],
    webhook_url: str | None,
    metadata: dict[str, str] | None,
    cancel_after: str | None = None,
) -> Batch:
    """Record the batch and its lines; the worker starts them (enqueued after commit).
    ``cancel_after``: each line's deadline from its start, unless a request has its
    own (kept on the line as ``cancel_after`` seconds: shared/batches/pump.py)."""
    default = parse_cancel_after(cancel_after, "cancel_after")
    if not requests:
        raise InvalidRequest("A batch needs at least one request.", param="requests")
    if len(requests) > MAX_LINES:
        raise InvalidRequest(f"At most {MAX_LINES} requests per batch.", param="requests")
    check_metadata(metadata)
    items, seen = [], set()
    for index, req in enumerate(requests):
        body = dict(req)
        custom_id = str(body.pop("custom_id", None) or f"request-{index + 1}")
        if len(custom_id) > MAX_CUSTOM_ID_CHARS:
            raise InvalidValue(
                f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters.",
                param=f"requests.{index}.custom_id",
            )
        if custom_id in seen:
            raise InvalidRequest(
                f"The custom_id '{custom_id}' is used twice.", param=f"requests.{index}.custom_id"
            )
        seen.add(custom_id)
        own = body.pop("cancel_after", None)
        if own is not None and not isinstance(own, str):
            raise InvalidValue(
                "cancel_after must be a duration such as '30s' or '5m'.",
                param=f"requests.{index}.cancel_after",
            )
        seconds = parse_cancel_after(own, f"requests.{index}.cancel_after") or default
        if seconds is not None:
            body[DEADLINE_FIELD] = seconds
        items.append({"line": index + 1, "custom_id": custom_id, "body": body})
    now = utcnow()
    batch = Batch(
        project_id=principal.project_id,
        key_id=principal.key_id,
        kind="native",
        webhook_url=webhook_url,
        batch_metadata=metadata,
        created_at=now,
        expires_at=now + timedelta(hours=24),
    )
    session.add(batch)
    session.flush()
    _insert_items(session, batch, items)
    session.flush()
    batch_id = batch.id
    after_commit(session, lambda: publish_batch_pump(batch_id))
    return batch


def _insert_items(session: Session, batch: Batch, items: list[dict[str, Any]]) -> None:
    rows = [
        {
            "id": new_id("batch_req"),
            "batch_id": batch.id,
            "project_id": batch.project_id,
            "line": it["line"],
            "custom_id": it["custom_id"],
            "body": it["body"],
            "status": ItemStatus.pending,
        }
        for it in items
    ]
    for start in range(0, len(rows), 5000):
        session.execute(sa.insert(BatchItem), rows[start : start + 5000])
    batch.total = len(rows)
    batch.status = BatchStatus.in_progress
    batch.in_progress_at = utcnow()
    session.add(batch)


def validate_batch(session: Session, batch_id: str) -> bool:
    """Worker step: read the input file, then fail the batch or create its lines.
    True when the batch now has lines to run."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.status != BatchStatus.validating:
        return False
    file = session.get(File, batch.input_file_id)
    # A file deleted since the batch was made has no object left: read as empty,
    # the batch fails naming an empty input rather than crashing on the read.
    live = file if file is not None and file.deleted_at is None else None
    lines = get_storage().lines(live.storage_key) if live is not None else iter(())
    items, errors = parse_input(lines, batch.endpoint)
    if errors:
        batch.status, batch.failed_at, batch.errors = BatchStatus.failed, utcnow(), errors[:1000]
        session.add(batch)
        session.flush()
        record_batch_event(
            session, batch, "batch.failed", render_batch(session, batch).model_dump(mode="json")
        )
    else:
        _insert_items(session, batch, items)
    after_commit(session, lambda: publish_changed(batch_id, "validated"))
    return not errors


# --- cancelling --------------------------------------------------------------------


def cancel_batch(session: Session, project_id: str, batch_id: str) -> Batch:
    """Lines not started end canceled; running ones finish. The worker finalizes the
    batch once none is running (a pump enqueued after commit)."""
    batch = get_batch(session, project_id, batch_id)
    if batch.status in (BatchStatus.cancelling, BatchStatus.cancelled):
        return batch
    if BatchStatus.cancelling not in BATCH_TRANSITIONS[BatchStatus(batch.status)]:
        raise Conflict(
            f"Batch '{batch_id}' is {batch.status} and cannot be cancelled.", param="batch_id"
        )
    batch.status, batch.cancelling_at = BatchStatus.cancelling, utcnow()
    stop_pending(session, batch, "batch_cancelled", "The batch was cancelled.")
    session.add(batch)
    session.flush()
    after_commit(session, lambda: publish_batch_pump(batch_id))
    return batch


# --- deleting ----------------------------------------------------------------------


def delete_batch(
    session: Session, storage: Storage, project_id: str, batch_id: str, actor: str
) -> Deleted:
    """Delete an ended batch (a running one is refused, 409: cancel it first): its
    jobs and the batch become tombstones (read as absent), its lines' bodies are
    cleared, its jobs' images, edit inputs and kept upstream images and its output
    and error files are removed from storage at once (DeleteObjects, 1,000 keys a
    call), and the deletion is audited. Deleting it again answers 404."""
    batch = get_batch(session, project_id, batch_id)
    if batch.status not in TERMINAL:
        raise Conflict(
            f"Batch '{batch_id}' is {batch.status}: it can be deleted once it has ended "
            "(cancel it first).",
            param="batch_id",
        )
    now = utcnow()
    # Guarded: of two deletes at once, one marks it and the other answers 404.
    marked = session.execute(
        sa.update(Batch)
        .where(col(Batch.id) == batch.id, col(Batch.deleted_at).is_(None))
        .values(deleted_at=now)
    )
    if cast(sa.CursorResult[Any], marked).rowcount != 1:
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
    job_ids = lifecycle.mark_batch_jobs_deleted(session, batch.id, now)
    keys = _job_objects(session, storage, project_id, job_ids)
    # The lines' bodies are the requests, an edit line's input image among them
    # (a data URL): they go with the batch; the rows stay for its counts.
    session.execute(sa.update(BatchItem).where(col(BatchItem.batch_id) == batch.id).values(body={}))
    # Its output and error files; not its input file, which is the user's own Files
    # object (another batch may read it, and DELETE /v1/files deletes it).
    files = [f for f in (batch.output_file_id, batch.error_file_id) if f]
    for file in session.exec(select(File).where(col(File.id).in_(files))):
        keys.append(file.storage_key)
        if file.deleted_at is None:
            file.deleted_at = now
            session.add(file)
    session.flush()
    # Marked first, in this transaction: a storage outage answers 503 and rolls the
    # marks back; a removal that ran twice finds nothing.
    storage.delete(keys)
    record(
        session,
        actor,
        "batch.delete",
        batch.id,
        {"status": batch.status, "jobs": len(job_ids), "objects": len(keys), "files": files},
        project_id=project_id,
    )
    return Deleted(id=batch.id, object="batch")


def _job_objects(
    session: Session, storage: Storage, project_id: str, job_ids: list[str]
) -> list[str]:
    """What the jobs stored, from their rows (a listing per job would cost a
    50,000-line batch 50,000 LIST calls): their images, an edit line's inputs and
    mask, and a queue provider's kept images (listed, for the few that have any)."""
    keys: list[str] = []
    for start in range(0, len(job_ids), 500):
        chunk = job_ids[start : start + 500]
        keys += session.exec(
            select(Image.storage_key).where(
                col(Image.project_id) == project_id, col(Image.job_id).in_(chunk)
            )
        )
        for job_id, request, upstream in session.execute(
            sa.select(col(Job.id), col(Job.request), col(Job.upstream)).where(
                col(Job.id).in_(chunk)
            )
        ):
            keys += job_object_keys(request, None)  # its inputs and mask
            if upstream:
                prefix = f"{job_prefix(project_id, job_id)}upstream/"
                keys += [obj.key for obj in storage.scan(prefix)]
    return keys


# --- reading -----------------------------------------------------------------------


def get_batch(session: Session, project_id: str, batch_id: str) -> Batch:
    return owned(
        session,
        Batch,
        project_id,
        batch_id,
        NotFound(f"No batch found with id '{batch_id}'.", param="batch_id"),
    )


def list_batches(
    session: Session, project_id: str, *, limit: int, after: str | None
) -> tuple[list[Batch], bool]:
    query = select(Batch).where(
        col(Batch.project_id) == project_id, col(Batch.deleted_at).is_(None)
    )
    return newest_first(session, query, col(Batch.id), limit=limit, after=after)


def open_batch_lines(session: Session) -> list[tuple[str, int]]:
    """(line status, count) over the batches still running, every project (metrics)."""
    rows = session.execute(
        sa.select(col(BatchItem.status), sa.func.count())
        .join(Batch, col(Batch.id) == col(BatchItem.batch_id))
        .where(col(Batch.status).in_(PUMPED))
        .group_by(col(BatchItem.status))
    ).all()
    return [(str(status), int(n)) for status, n in rows]
