"""Batches: OpenAI's Batch API over a JSONL file, and a native JSON batch.

A batch's lines become items; items become ordinary jobs on the batch queue a
few at a time (at most ``batch_max_in_flight`` per batch), so a 50,000-line
batch never floods the broker or starves other projects' sync requests. Every
step is a guarded transition in SQL: a restart of any process resumes the batch
(the sweeper pumps it), an item's job is created once, and a job runs to
completion once, so each line gets exactly one result.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.db import session_scope
from shared.errors import Conflict, ImagegenError, InvalidRequest, InvalidValue, NotFound
from shared.events import publish_job_changed
from shared.files import create_file, get_file
from shared.ids import new_id
from shared.jobs import images_by_job, job_failure, render_result
from shared.keys import Principal
from shared.limits import get_limiter, images_per_day_exceeded
from shared.models import Batch, BatchItem, File, Job, JobStatus, Project, table
from shared.queue import publish_deliveries, publish_jobs
from shared.registry import get_registry
from shared.schemas import GenerationParams
from shared.settings import get_settings
from shared.storable import find_unstorable
from shared.storage import get_storage
from shared.timeutil import to_unix, utcnow
from shared.validation import parse_request, validate_generation
from shared.webhooks import record_batch_event

log = logging.getLogger(__name__)

ENDPOINT = "/v1/images/generations"
MAX_LINES = 50_000
MAX_CUSTOM_ID_CHARS = 500  # the column
OPEN = ("validating", "in_progress", "cancelling")
FINAL_STATUS = {"in_progress": "completed", "cancelling": "cancelled", "expiring": "expired"}


# --- creating ----------------------------------------------------------------------

def create_openai_batch(session: Session, principal: Principal, *, input_file_id: str,
                        endpoint: str, completion_window: str,
                        metadata: dict[str, str] | None) -> Batch:
    if endpoint != ENDPOINT:
        raise InvalidRequest(f"Unsupported endpoint '{endpoint}': this service batches "
                             f"'{ENDPOINT}'.", param="endpoint")
    if completion_window != "24h":
        raise InvalidRequest("completion_window must be '24h'.", param="completion_window")
    _check_metadata(metadata)
    file = get_file(session, principal.project_id, input_file_id)
    if file.purpose != "batch":
        raise InvalidRequest(f"File '{input_file_id}' has purpose '{file.purpose}', not "
                             "'batch'.", param="input_file_id")
    now = utcnow()
    batch = Batch(project_id=principal.project_id, input_file_id=file.id, endpoint=endpoint,
                  completion_window=completion_window, batch_metadata=metadata,
                  created_at=now, expires_at=now + timedelta(hours=24))
    session.add(batch)
    session.flush()
    return batch


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items()):
        raise InvalidRequest("metadata holds at most 16 keys (64 characters) with values of "
                             "at most 512 characters.", param="metadata")


def parse_input(lines: Iterable[bytes]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Items from an OpenAI batch input file read line by line (never decoded whole),
    or the errors naming every bad line."""
    items: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def bad(line: int, code: str, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "line": line, "message": message, "param": param})

    for number, raw_bytes in enumerate(lines, start=1):
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError:
            bad(number, "invalid_file", f"Line {number} is not UTF-8 text.")
            continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            bad(number, "invalid_json_line", f"Line {number} is not valid JSON: {exc}.")
            continue
        if not isinstance(obj, dict):
            bad(number, "invalid_request", f"Line {number} is not a JSON object.")
            continue
        custom_id = obj.get("custom_id")
        unfit = find_unstorable(obj)
        if unfit:
            bad(number, "invalid_value", f"Line {number}: '{unfit[0]}' contains {unfit[1]}, "
                "which is not allowed.", unfit[0])
        if not isinstance(custom_id, str) or not custom_id:
            bad(number, "missing_required_parameter", "custom_id must be a non-empty string.",
                "custom_id")
        elif len(custom_id) > MAX_CUSTOM_ID_CHARS:
            bad(number, "invalid_value", f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} "
                "characters.", "custom_id")
        elif custom_id in seen:
            bad(number, "duplicate_custom_id", f"The custom_id '{custom_id}' is used twice.",
                "custom_id")
        else:
            seen.add(custom_id)
        if obj.get("method") != "POST":
            bad(number, "invalid_method", "method must be 'POST'.", "method")
        if obj.get("url") != ENDPOINT:
            bad(number, "invalid_url", f"url must be '{ENDPOINT}', the batch's endpoint.", "url")
        if not isinstance(obj.get("body"), dict):
            bad(number, "invalid_body", "body must be a JSON object.", "body")
        items.append({"line": number, "custom_id": custom_id, "body": obj.get("body")})
    if len(items) > MAX_LINES:
        errors.insert(0, {"code": "too_many_lines", "line": None, "param": None,
                          "message": f"The file has {len(items)} requests; at most "
                                     f"{MAX_LINES} are allowed."})
    if not items and not errors:
        errors.append({"code": "empty_file", "line": None, "param": None,
                       "message": "The input file has no requests."})
    return items, errors


def _insert_items(session: Session, batch: Batch, items: list[dict[str, Any]]) -> None:
    rows = [{"id": new_id("batch_req"), "batch_id": batch.id, "project_id": batch.project_id,
             "line": it["line"], "custom_id": it["custom_id"], "body": it["body"],
             "status": "pending"} for it in items]
    for start in range(0, len(rows), 5000):
        session.execute(sa.insert(BatchItem), rows[start:start + 5000])
    batch.total = len(rows)
    batch.status = "in_progress"
    batch.in_progress_at = utcnow()
    session.add(batch)


def validate_batch(batch_id: str) -> None:
    """Worker step: read the input file, fail the batch or create its items."""
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status != "validating":
            return
        file = session.get(File, batch.input_file_id)
        lines = get_storage().lines(file.storage_key) if file is not None else iter(())
        items, errors = parse_input(lines)
        if errors:
            now = utcnow()
            batch.status, batch.failed_at, batch.errors = "failed", now, errors[:1000]
            session.add(batch)
            deliveries = record_batch_event(session, batch, "batch.failed",
                                            render_batch(session, batch))
        else:
            _insert_items(session, batch, items)
            deliveries = []
    publish_deliveries(deliveries)
    publish_job_changed(batch_id, "validated")
    pump(batch_id)


def create_native_batch(session: Session, principal: Principal, requests: list[dict[str, Any]],
                        webhook_url: str | None, metadata: dict[str, str] | None) -> Batch:
    if not requests:
        raise InvalidRequest("A batch needs at least one request.", param="requests")
    if len(requests) > MAX_LINES:
        raise InvalidRequest(f"At most {MAX_LINES} requests per batch.", param="requests")
    _check_metadata(metadata)
    items, seen = [], set()
    for index, req in enumerate(requests):
        body = dict(req)
        custom_id = str(body.pop("custom_id", None) or f"request-{index + 1}")
        if len(custom_id) > MAX_CUSTOM_ID_CHARS:
            raise InvalidValue(f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters.",
                               param=f"requests.{index}.custom_id")
        if custom_id in seen:
            raise InvalidRequest(f"The custom_id '{custom_id}' is used twice.",
                                 param=f"requests.{index}.custom_id")
        seen.add(custom_id)
        items.append({"line": index + 1, "custom_id": custom_id, "body": body})
    now = utcnow()
    batch = Batch(project_id=principal.project_id, kind="native", webhook_url=webhook_url,
                  batch_metadata=metadata, created_at=now, expires_at=now + timedelta(hours=24))
    session.add(batch)
    session.flush()
    _insert_items(session, batch, items)
    session.flush()
    return batch


# --- running -----------------------------------------------------------------------

def pump(batch_id: str) -> int:
    """Top the batch up to its in-flight bound; finalize it once nothing is left."""
    settings = get_settings()
    bound = settings.batch_max_in_flight
    registry = get_registry()
    created: list[str] = []
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status not in ("in_progress", "cancelling", "expiring"):
            return 0
        now = utcnow()
        if batch.status == "in_progress" and batch.expires_at and batch.expires_at < now:
            _stop_pending(session, batch, "batch_expired",
                          "The batch expired before this request ran.")
            batch.status = "expiring"
            session.add(batch)
        in_flight = _count(session, batch.id, "queued")
        room = bound - in_flight
        pending: list[sa.Row[Any]] = []
        if batch.status == "in_progress" and room >= max(1, bound // 4):
            pending = list(session.execute(
                sa.select(col(BatchItem.id), col(BatchItem.body))
                .where(col(BatchItem.batch_id) == batch.id, col(BatchItem.status) == "pending")
                .order_by(col(BatchItem.line)).limit(room)
                .with_for_update(skip_locked=True)).all())
        valid: list[tuple[str, GenerationParams, str]] = []
        for item_id, body in pending:
            try:
                params = validate_generation(parse_request(body), registry)
                valid.append((item_id, params, registry.get(params.model).name))
            except ImagegenError as exc:
                _fail_item(session, item_id, exc, now)
        jobs = _queue_lines(session, batch, valid, now) if valid else []
        created = [job["id"] for job in jobs]
        finished = not created and in_flight == 0 and _count(session, batch.id, "pending") == 0
    # Lines run in chunks: one message, one claim and one finishing transaction per
    # chunk instead of per line (if a message is lost, the job sweeper re-publishes
    # its jobs one by one).
    size = max(1, settings.batch_chunk_size)
    for start in range(0, len(created), size):
        publish_jobs(created[start:start + size], settings.batch_queue)
    if finished:
        finalize(batch_id)
    return len(created)


def _queue_lines(session: Session, batch: Batch, valid: list[tuple[str, GenerationParams, str]],
                 now: datetime) -> list[dict[str, Any]]:
    """Jobs for validated lines, as far as the project's images a day allow (lines
    past it fail with its 429, like any request; the rest of the batch goes on)."""
    project = session.get(Project, batch.project_id)
    quota = project.images_per_day if project else None
    granted = get_limiter().take_images(batch.project_id, quota,
                                        [params.n for _, params, _ in valid])
    for item_id, _, _ in valid[granted:]:
        _fail_item(session, item_id, images_per_day_exceeded(quota), now)
    # Plain rows and two executemany statements: the ORM's unit of work for
    # hundreds of new jobs per second was a fifth of a batch worker's CPU.
    template = Job(id="", project_id=batch.project_id, surface="batch", model="",
                   queue=get_settings().batch_queue, request={}, batch_id=batch.id,
                   published_at=now, created_at=now).model_dump()
    jobs = [{**template, "id": new_id("job"), "model": model, "request": params.model_dump(),
             "batch_item_id": item_id} for item_id, params, model in valid[:granted]]
    if jobs:
        session.execute(sa.insert(table(Job)), jobs)
        items = table(BatchItem).c
        session.execute(sa.update(table(BatchItem))
                        .where(items.id == sa.bindparam("item_id"))
                        .values(status="queued", job_id=sa.bindparam("new_job_id")),
                        [{"item_id": job["batch_item_id"], "new_job_id": job["id"]}
                         for job in jobs])
    return jobs


def _error_body(err: ImagegenError) -> dict[str, Any]:
    """A line's error as OpenAI's error object."""
    return {"message": err.message, "type": err.error_type, "param": err.param,
            "code": err.code}


def _fail_item(session: Session, item_id: str, exc: ImagegenError, now: datetime) -> None:
    session.execute(sa.update(BatchItem).where(col(BatchItem.id) == item_id).values(
        status="failed", status_code=exc.status_code, finished_at=now, error=_error_body(exc)))


def _count(session: Session, batch_id: str, status: str) -> int:
    return int(session.execute(
        sa.select(sa.func.count()).select_from(BatchItem)
        .where(col(BatchItem.batch_id) == batch_id, col(BatchItem.status) == status)
    ).scalar_one())


def _stop_pending(session: Session, batch: Batch, code: str, message: str) -> None:
    """Items not started end canceled: pending ones, and queued jobs not yet running."""
    now = utcnow()
    error = {"code": code, "message": message}
    session.execute(sa.update(BatchItem)
                    .where(col(BatchItem.batch_id) == batch.id,
                           col(BatchItem.status) == "pending")
                    .values(status="canceled", error=error, finished_at=now))
    queued = list(session.execute(
        sa.update(Job)
        .where(col(Job.batch_id) == batch.id, col(Job.status) == JobStatus.queued)
        .values(status=JobStatus.canceled, canceled_at=now, finished_at=now)
        .returning(col(Job.batch_item_id))).scalars())
    if queued:
        session.execute(sa.update(BatchItem)
                        .where(col(BatchItem.id).in_(queued), col(BatchItem.status) == "queued")
                        .values(status="canceled", error=error, finished_at=now))


def item_finished(session: Session, job: Job) -> None:
    """In the transaction that ends a batch job: keep the line's result."""
    if not job.batch_item_id:
        return
    values: dict[str, Any] = {"finished_at": utcnow()}
    if job.status == JobStatus.succeeded:
        values |= {"status": "succeeded", "status_code": 200}
    elif job.status == JobStatus.canceled:
        values |= {"status": "canceled",
                   "error": {"code": "batch_cancelled", "message": "The batch was cancelled."}}
    else:
        err = job_failure(job)
        values |= {"status": "failed", "status_code": err.status_code,
                   "error": _error_body(err)}
    session.execute(sa.update(BatchItem)
                    .where(col(BatchItem.id) == job.batch_item_id,
                           col(BatchItem.status) == "queued").values(**values))


def lines_succeeded(session: Session, item_ids: list[str]) -> None:
    """``item_finished`` for many succeeded lines at once (a chunk's bulk path)."""
    if item_ids:
        session.execute(sa.update(BatchItem)
                        .where(col(BatchItem.id).in_(item_ids),
                               col(BatchItem.status) == "queued")
                        .values(status="succeeded", status_code=200, finished_at=utcnow())
                        .execution_options(synchronize_session=False))


def cancel_batch(session: Session, project_id: str, batch_id: str) -> Batch:
    batch = get_batch(session, project_id, batch_id)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    if batch.status not in ("validating", "in_progress"):
        raise Conflict(f"Batch '{batch_id}' is {batch.status} and cannot be cancelled.",
                       param="batch_id")
    batch.status, batch.cancelling_at = "cancelling", utcnow()
    _stop_pending(session, batch, "batch_cancelled", "The batch was cancelled.")
    session.add(batch)
    session.flush()
    return batch


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


# --- reading -----------------------------------------------------------------------

def get_batch(session: Session, project_id: str, batch_id: str) -> Batch:
    batch = session.exec(select(Batch).where(col(Batch.id) == batch_id,
                                             col(Batch.project_id) == project_id)).first()
    if batch is None:
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


def list_batches(session: Session, project_id: str, *, limit: int,
                 after: str | None) -> tuple[list[Batch], bool]:
    query = select(Batch).where(col(Batch.project_id) == project_id)
    if after is not None:
        query = query.where(col(Batch.id) < after)
    rows = list(session.exec(query.order_by(col(Batch.id).desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def request_counts(session: Session, batch: Batch) -> dict[str, int]:
    counts: Counter[str] = Counter(dict(session.execute(  # type: ignore[arg-type]
        sa.select(col(BatchItem.status), sa.func.count()).where(
            col(BatchItem.batch_id) == batch.id).group_by(col(BatchItem.status))).all()))
    return {"total": batch.total, "completed": counts["succeeded"],
            "failed": counts["failed"] + counts["canceled"]}


def render_batch(session: Session, batch: Batch) -> dict[str, Any]:
    status = "finalizing" if batch.status == "expiring" else batch.status
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": status, "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id, "created_at": to_unix(batch.created_at),
        "in_progress_at": to_unix(batch.in_progress_at),
        "expires_at": to_unix(batch.expires_at), "finalizing_at": to_unix(batch.finalizing_at),
        "completed_at": to_unix(batch.completed_at), "failed_at": to_unix(batch.failed_at),
        "expired_at": to_unix(batch.expired_at), "cancelling_at": to_unix(batch.cancelling_at),
        "cancelled_at": to_unix(batch.cancelled_at),
        "request_counts": request_counts(session, batch),
        "metadata": batch.batch_metadata,
    }


def _items_with_jobs(session: Session, batch: Batch, where: Any,
                     limit: int | None) -> list[tuple[BatchItem, Job | None]]:
    """The batch's lines in order, each with its job, in one query."""
    query = (select(BatchItem, Job)
             .join(Job, col(Job.id) == col(BatchItem.job_id), isouter=True)
             .where(col(BatchItem.batch_id) == batch.id, where)
             .order_by(col(BatchItem.line)))
    if limit is not None:
        query = query.limit(limit)
    return [(item, job) for item, job in session.exec(query)]


def list_items(session: Session, batch: Batch, *, limit: int,
               after: int | None) -> tuple[list[dict[str, Any]], bool]:
    """A page of lines with their results (fresh URLs), by line number."""
    settings = get_settings()
    after_clause = col(BatchItem.line) > after if after is not None else sa.true()
    rows = _items_with_jobs(session, batch, after_clause, limit + 1)
    images = images_by_job(session, batch.project_id,
                           [job.id for item, job in rows[:limit]
                            if item.status == "succeeded" and job is not None])
    page = []
    for item, job in rows[:limit]:
        entry: dict[str, Any] = {"id": item.id, "custom_id": item.custom_id, "line": item.line,
                                 "status": item.status, "job_id": item.job_id,
                                 "response": None, "error": item.error}
        if item.status == "succeeded" and job is not None:
            body = render_result(job, images[job.id], get_storage(),
                                 settings.public_base_url(), settings.url_expiry_seconds)
            entry["response"] = {"status_code": 200, "body": body.model_dump(exclude_none=True)}
        elif item.status_code is not None:
            entry["response"] = {"status_code": item.status_code, "body": {"error": item.error}}
        page.append(entry)
    return page, len(rows) > limit
