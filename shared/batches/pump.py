"""Running a batch: lines become jobs a few at a time, and each finished job's
result is kept on its line. Every change is a guarded statement, so any number
of pumps (the worker's batch tick, the sweeper) may run side by side."""

from __future__ import annotations

import base64
import binascii
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from shared.batches.input import EDITS_ENDPOINT
from shared.batches.models import PUMPED, Batch, BatchItem, BatchStatus, ItemStatus
from shared.core.broker import publish_batch_pump, publish_jobs, publish_upstream_cancel
from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.errors import (
    ClientError,
    ErrorCode,
    ImagegenError,
    InsufficientQuota,
    InvalidRequest,
    render,
)
from shared.core.ids import new_id
from shared.core.outbox import after_commit, after_rollback
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.files.service import get_file
from shared.imaging import check_mask, check_total_pixels, read_input
from shared.jobs import lifecycle
from shared.jobs.input import parse_request, validate_edit, validate_generation
from shared.jobs.models import WAITING, Job, JobStatus
from shared.jobs.schemas import GenerationParams
from shared.jobs.service import store_inputs
from shared.jobs.views import job_failure
from shared.projects.budgets import (
    Budget,
    Budgets,
    estimate,
    get_budgets,
    key_budgets,
    project_budgets,
)
from shared.projects.limits import get_limiter, images_per_day_exceeded
from shared.projects.models import ApiKey, Project
from shared.registry import DiffusersModel, Registry, get_registry

# A native batch line's deadline, in seconds from its start: its own or the batch's
# ``cancel_after``, kept on the line's body (shared/batches/service.py) and taken off
# it here, before the body is read as a request.
DEADLINE_FIELD = "cancel_after_seconds"


@dataclass(frozen=True)
class Pumped:
    started: int  # lines that became jobs now
    finished: bool  # nothing left to run: the batch is ready to finalize


def pump(session: Session, batch_id: str) -> Pumped:
    """Top the batch up to its in-flight bound (the new jobs are published after
    commit, in chunks); says whether nothing is left, so the caller finalizes it."""
    settings = get_settings()
    bound = settings.batch_max_in_flight
    registry = get_registry()
    batch = session.get(Batch, batch_id)
    if batch is None or batch.status not in PUMPED:
        return Pumped(0, False)
    now = utcnow()
    if batch.status == BatchStatus.in_progress and batch.expires_at and batch.expires_at < now:
        stop_pending(
            session, batch, ErrorCode.batch_expired, "The batch expired before this request ran."
        )
        batch.status = BatchStatus.expiring
        session.add(batch)
    elif batch.status != BatchStatus.in_progress:
        # Stopping: a line that was running when the batch stopped and then went
        # back to the queue (waiting for room, or for its queue provider's job)
        # is stopped now, and its upstream job canceled.
        why: tuple[str, str] = (
            ErrorCode.batch_expired,
            "The batch expired before this request ran.",
        )
        if batch.status == BatchStatus.cancelling:
            why = ("batch_cancelled", "The batch was cancelled.")
        stop_pending(session, batch, *why)
    in_flight = _count(session, batch.id, ItemStatus.queued)
    # The bound is the project's, across its open batches: projects share the
    # workers and upstreams fairly however many batches each runs at once (their
    # lines take turns for an upstream's room in order: shared/jobs/capacity.py).
    siblings = _open_batches(session, batch.project_id, batch.id)
    room = bound - in_flight - _in_flight(session, siblings)
    pending: list[sa.Row[Any]] = []
    if batch.status == BatchStatus.in_progress and room >= max(1, bound // 4):
        pending = list(
            session.execute(
                sa.select(col(BatchItem.id), col(BatchItem.body))
                .where(
                    col(BatchItem.batch_id) == batch.id, col(BatchItem.status) == ItemStatus.pending
                )
                .order_by(col(BatchItem.line))
                .limit(room)
                .with_for_update(skip_locked=True)
            ).all()
        )
    valid: list[tuple[str, GenerationParams, str, str]] = []
    deadlines = _deadlines(batch, pending, now)
    inputs: dict[str, int] = {}  # an edit line's stored input bytes, by its job
    for item_id, body in pending:
        job_id = new_id("job")
        try:
            if batch.endpoint == EDITS_ENDPOINT:
                params, inputs[job_id] = _edit_line(session, batch.project_id, job_id, body)
            else:
                params = validate_generation(parse_request(body), registry)
            valid.append((item_id, params, registry.get(params.model).name, job_id))
        except ClientError as exc:
            _fail_item(session, item_id, exc, now)
    jobs = _queue_lines(session, batch, valid, now, deadlines, inputs) if valid else []
    created = [job["id"] for job in jobs]
    drained = not pending and _count(session, batch.id, ItemStatus.pending) == 0
    # In flight counted again, after the pending lines: a concurrent pump moves its
    # lines pending -> queued in one commit, and with in flight counted before that
    # commit and pending after it, both counts missed them and the batch was
    # finalized while they ran (completed with none of their results: seen in
    # e2e under load). This order sees them in one count or the other.
    finished = not created and drained and _count(session, batch.id, ItemStatus.queued) == 0
    if drained and siblings:
        # The project's room this batch no longer needs goes to its other batches
        # (only those with lines left: two drained batches never wake each other).
        for sibling in _with_pending(session, siblings):
            after_commit(session, partial(publish_batch_pump, sibling))
    # Lines run in chunks: one message, one claim and one finishing transaction per
    # chunk instead of per line (if a message is lost, the job sweeper re-publishes
    # its jobs one by one).
    _publish_after_commit(session, jobs, max(1, settings.batch_chunk_size))
    return Pumped(len(created), finished)


def _publish_after_commit(session: Session, jobs: list[dict[str, Any]], size: int) -> None:
    """The new lines' messages, each of ``size`` jobs of one queue, sent at commit."""
    by_queue: dict[str, list[str]] = {}
    for job in jobs:
        by_queue.setdefault(job["queue"], []).append(job["id"])
    for queue, ids in by_queue.items():
        for start in range(0, len(ids), size):
            after_commit(session, partial(publish_jobs, ids[start : start + size], queue))


def _line_queue(registry: Registry, model: str) -> str:
    """A line runs on the batch queue, except a local model's: on its GPU queue,
    where its device takes turns between projects and batches calls (issue 30)."""
    spec = registry.get(model)
    return spec.queue if isinstance(spec, DiffusersModel) else get_settings().batch_queue


def _deadlines(batch: Batch, pending: list[sa.Row[Any]], now: datetime) -> dict[str, datetime]:
    """A native batch's lines' deadlines, from their start now (taken off their
    bodies before these are read as requests)."""
    found: dict[str, datetime] = {}
    if batch.kind != "native":
        return found
    for item_id, body in pending:
        seconds = body.pop(DEADLINE_FIELD, None) if isinstance(body, dict) else None
        if isinstance(seconds, (int, float)):
            found[item_id] = now + timedelta(seconds=seconds)
    return found


def _queue_lines(
    session: Session,
    batch: Batch,
    valid: list[tuple[str, GenerationParams, str, str]],
    now: datetime,
    deadlines: dict[str, datetime],
    inputs: dict[str, int],
) -> list[dict[str, Any]]:
    """Jobs for validated lines (each with its deadline, if it has one), as far as
    the budgets of the project and of the key that created the batch cover their
    estimates (past that the batch stops taking lines: ``_out_of_budget``) and its
    images a day allow (lines past it fail with its 429, like any request; the rest
    of the batch goes on)."""
    registry = get_registry()
    project = session.get(Project, batch.project_id)
    quota = project.images_per_day if project else None
    valid = _within_budget(session, batch, project, valid, now)
    granted = get_limiter().take_images(
        batch.project_id, quota, [params.n for _, params, _, _ in valid]
    )
    get_budgets().release([job_id for _, _, _, job_id in valid[granted:]])
    for item_id, _, _, _ in valid[granted:]:
        _fail_item(session, item_id, images_per_day_exceeded(quota), now)
    # Plain rows and two executemany statements: the ORM's unit of work for
    # hundreds of new jobs per second was a fifth of a batch worker's CPU.
    template = Job(
        id="",
        project_id=batch.project_id,
        key_id=batch.key_id,  # the key's spend, in SQL too (budgets.spent_in_sql)
        surface="batch",
        model="",
        queue=get_settings().batch_queue,
        request={},
        batch_id=batch.id,
        published_at=now,
        created_at=now,
    ).model_dump()
    jobs = [
        {
            **template,
            "id": job_id,
            "model": model,
            "queue": _line_queue(registry, model),
            "request": params.model_dump(),
            "batch_item_id": item_id,
            "deadline_at": deadlines.get(item_id),
            "input_bytes": inputs.get(job_id),
        }
        for item_id, params, model, job_id in valid[:granted]
    ]
    if jobs:
        lifecycle.create(session, jobs)
        items = table(BatchItem).c
        session.execute(
            sa.update(table(BatchItem))
            .where(items.id == sa.bindparam("item_id"))
            .values(status=ItemStatus.queued, job_id=sa.bindparam("new_job_id")),
            [{"item_id": job["batch_item_id"], "new_job_id": job["id"]} for job in jobs],
        )
    return jobs


def _within_budget(
    session: Session,
    batch: Batch,
    project: Project | None,
    valid: list[tuple[str, GenerationParams, str, str]],
    now: datetime,
) -> list[tuple[str, GenerationParams, str, str]]:
    """The lines whose estimates the budgets cover (the project's, and the own ones
    of the key that created the batch), reserved in order (one round trip). Once
    one is not covered the batch stops taking lines: it and every pending line fail
    ``insufficient_quota`` (OpenAI's Batch: the batch completes with what ran, the
    rest in its error file), while the lines in flight finish."""
    budgets: list[Budget] = []
    if project is not None:
        budgets += project_budgets(project.id, project.daily_budget_usd, project.monthly_budget_usd)
    # A key revoked since still counts: what its batch spends is its spend.
    key = session.get(ApiKey, batch.key_id) if batch.key_id else None
    if key is not None:
        budgets += key_budgets(key.id, key.daily_budget_usd, key.monthly_budget_usd)
    if not budgets:
        return valid
    registry = get_registry()
    amounts = [estimate(registry.get(model), params) for _, params, model, _ in valid]
    job_ids = [job_id for _, _, _, job_id in valid]
    granted, blocked = get_budgets().reserve(
        budgets, job_ids, amounts, lambda: nullcontext(session), now
    )
    # Reserved in Redis before the jobs' rows commit: a rollback gives it back.
    after_rollback(session, partial(get_budgets().release, job_ids[:granted]))
    if blocked is not None:
        refusal = blocked.refusal(now, amounts[granted])
        for item_id, _, _, _ in valid[granted:]:
            _fail_item(session, item_id, refusal, now)
        _out_of_budget(session, batch, refusal, now)
    return valid[:granted]


def _out_of_budget(session: Session, batch: Batch, exc: InsufficientQuota, now: datetime) -> None:
    """Every line not started yet fails with the budget's 429; those in flight run on."""
    session.execute(
        sa.update(BatchItem)
        .where(col(BatchItem.batch_id) == batch.id, col(BatchItem.status) == ItemStatus.pending)
        .values(
            status=ItemStatus.failed,
            status_code=exc.status_code,
            finished_at=now,
            error=render(exc).model_dump(),
        )
    )


def _fail_item(session: Session, item_id: str, exc: ImagegenError, now: datetime) -> None:
    session.execute(
        sa.update(BatchItem)
        .where(col(BatchItem.id) == item_id)
        .values(
            status=ItemStatus.failed,
            status_code=exc.status_code,
            finished_at=now,
            error=render(exc).model_dump(),
        )
    )


def _open_batches(session: Session, project_id: str, but: str) -> list[str]:
    """The project's other batches being pumped (a handful)."""
    return list(
        session.execute(
            sa.select(col(Batch.id)).where(
                col(Batch.project_id) == project_id,
                col(Batch.status).in_(PUMPED),
                col(Batch.id) != but,
            )
        ).scalars()
    )


def _in_flight(session: Session, batch_ids: list[str]) -> int:
    if not batch_ids:
        return 0
    return int(
        session.execute(
            sa.select(sa.func.count())
            .select_from(BatchItem)
            .where(
                col(BatchItem.batch_id).in_(batch_ids), col(BatchItem.status) == ItemStatus.queued
            )
        ).scalar_one()
    )


def _with_pending(session: Session, batch_ids: list[str]) -> list[str]:
    return [
        batch_id
        for batch_id in batch_ids
        if session.execute(
            sa.select(col(BatchItem.id))
            .where(col(BatchItem.batch_id) == batch_id, col(BatchItem.status) == ItemStatus.pending)
            .limit(1)
        ).first()
    ]


def _count(session: Session, batch_id: str, status: ItemStatus) -> int:
    return int(
        session.execute(
            sa.select(sa.func.count())
            .select_from(BatchItem)
            .where(col(BatchItem.batch_id) == batch_id, col(BatchItem.status) == status)
        ).scalar_one()
    )


def stop_pending(session: Session, batch: Batch, code: str, message: str) -> None:
    """Items not started end canceled: pending ones, and queued jobs not yet running."""
    now = utcnow()
    error = {"code": code, "message": message}
    session.execute(
        sa.update(BatchItem)
        .where(col(BatchItem.batch_id) == batch.id, col(BatchItem.status) == ItemStatus.pending)
        .values(status=ItemStatus.canceled, error=error, finished_at=now)
    )
    # Lines waiting on a queue provider's job: canceled there too, once committed
    # (the task cancels only what is still canceled then).
    # (None is stored as JSON null, not SQL NULL: told apart here, in Python; at
    # most the batch's lines in flight are read.)
    waiting = session.execute(
        sa.select(col(Job.id), col(Job.queue), col(Job.upstream)).where(
            col(Job.batch_id) == batch.id, col(Job.status).in_(WAITING)
        )
    ).all()
    for job_id, queue, upstream in waiting:
        if upstream:
            after_commit(session, partial(publish_upstream_cancel, job_id, queue))
    queued = lifecycle.cancel_batch_jobs(session, batch.id, now)
    if queued:
        session.execute(
            sa.update(BatchItem)
            .where(col(BatchItem.id).in_(queued), col(BatchItem.status) == ItemStatus.queued)
            .values(status=ItemStatus.canceled, error=error, finished_at=now)
        )
        if isinstance(get_budgets(), Budgets):  # their reservations, once they never run
            jobs = _jobs_of(session, queued)
            after_commit(session, lambda: get_budgets().release(list(jobs)))


def item_finished(session: Session, job: Job) -> None:
    """In the transaction that ends a batch job: keep the line's result (and, after
    commit, settle its budget at its cost: a failure costs nothing)."""
    if not job.batch_item_id:
        return
    cost = job.cost_usd if job.status == JobStatus.succeeded else None
    after_commit(session, lambda: get_budgets().settle(job.id, cost))
    values: dict[str, Any] = {"finished_at": utcnow()}
    if job.status == JobStatus.succeeded:
        values |= {"status": ItemStatus.succeeded, "status_code": 200}
    elif job.status == JobStatus.canceled and job.error_code == ErrorCode.deadline_exceeded:
        # Its own deadline (a native line's cancel_after): canceled, not charged.
        values |= {
            "status": ItemStatus.canceled,
            "error": {"code": job.error_code, "message": job.error_message},
        }
    elif job.status == JobStatus.canceled:
        values |= {
            "status": ItemStatus.canceled,
            "error": {"code": ErrorCode.batch_cancelled, "message": "The batch was cancelled."},
        }
    else:
        err = job_failure(job)
        values |= {
            "status": ItemStatus.failed,
            "status_code": err.status_code,
            "error": render(err).model_dump(),
        }
    session.execute(
        sa.update(BatchItem)
        .where(col(BatchItem.id) == job.batch_item_id, col(BatchItem.status) == ItemStatus.queued)
        .values(**values)
    )


def lines_succeeded(session: Session, item_ids: list[str]) -> None:
    """``item_finished`` for many succeeded lines at once (a chunk's bulk path)."""
    if item_ids:
        session.execute(
            sa.update(BatchItem)
            .where(col(BatchItem.id).in_(item_ids), col(BatchItem.status) == ItemStatus.queued)
            .values(status=ItemStatus.succeeded, status_code=200, finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if isinstance(get_budgets(), Budgets):  # with Redis: their costs settle budgets
            costs = _jobs_of(session, item_ids)
            after_commit(session, lambda: get_budgets().settle_many(costs))


def _jobs_of(session: Session, item_ids: list[str]) -> dict[str, float | None]:
    """The lines' jobs and their costs (read in the transaction that ended them)."""
    rows = session.execute(
        sa.select(col(Job.id), col(Job.cost_usd))
        .join(BatchItem, col(BatchItem.job_id) == col(Job.id))
        .where(col(BatchItem.id).in_(item_ids))
    ).all()
    return {job_id: cost for job_id, cost in rows}


# --- batches of edits ----------------------------------------------------------------


def _edit_line(
    session: Session, project_id: str, job_id: str, body: Any
) -> tuple[GenerationParams, int]:
    """An edit line: its fields checked as an edit's are, its images (file ids or
    data URLs) read, checked and stored under the job it becomes; with the bytes
    stored (storage accounting)."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object.", param="body")
    settings = get_settings()
    fields = {k: v for k, v in body.items() if k not in ("image", "mask")}
    params = validate_edit(fields, get_registry(), "edit")
    refs = body.get("image")
    refs = refs if isinstance(refs, list) else [] if refs is None else [refs]
    if not refs:
        raise InvalidRequest(
            "'image' is required: a file id or a data URL, or a list of them.",
            param="image",
            code=ErrorCode.missing_required_parameter,
        )
    if len(refs) > settings.edit_max_images:
        raise InvalidRequest(f"At most {settings.edit_max_images} images per edit.", param="image")
    limits = (settings.edit_max_image_bytes, settings.edit_max_image_pixels)
    images = [
        read_input(_image_bytes(session, project_id, r, "image"), "image", *limits) for r in refs
    ]
    check_total_pixels(images, settings.edit_max_total_pixels)
    mask = None
    if body.get("mask") is not None:
        raw = _image_bytes(session, project_id, body["mask"], "mask")
        mask = read_input(raw, "mask", *limits)
        check_mask(mask, images[0])
    keys, mask_key = store_inputs(get_storage(), project_id, job_id, images, mask)
    stored = sum(len(i.data) for i in images) + (len(mask.data) if mask else 0)
    return params.model_copy(update={"images": keys, "mask": mask_key}), stored


def _image_bytes(session: Session, project_id: str, ref: Any, param: str) -> bytes:
    """A line's image: ``data:image/...;base64,...`` or the id of an uploaded file."""
    if isinstance(ref, str) and ref.startswith("data:"):
        header, _, data = ref.partition(",")
        if header.endswith(";base64"):
            try:
                return base64.b64decode(data, validate=True)
            except binascii.Error:
                pass
        raise InvalidRequest(f"'{param}' is not a base64 data URL.", param=param)
    if isinstance(ref, str) and ref.startswith(("file_", "file-")):
        return get_storage().get(get_file(session, project_id, ref).storage_key)
    raise InvalidRequest(f"'{param}' must be a file id or a data URL.", param=param)
