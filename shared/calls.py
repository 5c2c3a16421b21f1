"""Trace calls in Weave's shapes: one per tracked generation, on both surfaces.

The API opens the call in the same transaction that records the job; the worker
closes it in the same transaction that finishes the job. Outputs are stored
without image URLs and rendered on read with fresh ones, so a call never holds
an expired link.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
import uuid6
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from shared.models import Call, Job
from shared.timeutil import utcnow

OP_WEAVE = "weave.image_generation_create"
OP_OPENAI = "openai.images.generate"


def new_call_id() -> str:
    return str(uuid6.uuid7())


def normalise_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Provider usage in Weave's terms: prompt/completion/total tokens."""
    if not usage:
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    total = usage.get("total_tokens")
    if total is None and isinstance(prompt, int) and isinstance(completion, int):
        total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def start_call(session: Session, job: Job, *, op_name: str, inputs: dict[str, Any],
               wb_user_id: str) -> Call:
    call_id = new_call_id()
    call = Call(id=call_id, trace_id=new_call_id(), project_id=job.project_id, op_name=op_name,
                inputs=inputs, wb_user_id=wb_user_id, job_id=job.id,
                attributes={"job_id": job.id, "surface": job.surface},
                started_at=job.created_at)
    session.add(call)
    job.call_id = call_id
    session.add(job)
    session.flush()
    return call


def finish_call(session: Session, job: Job, *, output: dict[str, Any] | None,
                exception: str | None, usage: dict[str, Any] | None) -> None:
    if not job.call_id:
        return
    summary: dict[str, Any] = {}
    norm = normalise_usage(usage)
    if norm:
        summary["usage"] = {job.model: {"requests": 1, **norm}}
    session.execute(
        sa.update(Call).where(col(Call.id) == job.call_id, col(Call.ended_at).is_(None))
        .values(ended_at=utcnow(), output=output, exception=exception, summary=summary)
    )


MAX_FILTER_IDS = 10_000
INT64_MAX = 2**63 - 1  # LIMIT and OFFSET are bigint


class CallFilter(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Each list becomes one bound parameter per item; PostgreSQL takes at most 65,535
    # in one statement, so five full lists still fit.
    op_names: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    call_ids: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    trace_ids: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    parent_ids: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    wb_user_ids: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    trace_roots_only: bool | None = None


class SortBy(BaseModel):
    field: Literal["started_at", "ended_at", "op_name", "id", "display_name", "trace_id"]
    direction: Literal["asc", "desc"] = "asc"


class CallsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    project_id: str
    filter: CallFilter | None = None
    limit: int | None = Field(default=None, ge=0, le=INT64_MAX)
    offset: int | None = Field(default=None, ge=0, le=INT64_MAX)
    sort_by: list[SortBy] | None = None


def _filtered(project_id: str, flt: CallFilter | None) -> Any:
    query = select(Call).where(col(Call.project_id) == project_id)
    if flt is None:
        return query
    for values, column in ((flt.op_names, Call.op_name), (flt.call_ids, Call.id),
                           (flt.trace_ids, Call.trace_id), (flt.parent_ids, Call.parent_id),
                           (flt.wb_user_ids, Call.wb_user_id)):
        if values is not None:
            query = query.where(col(column).in_(values))
    if flt.trace_roots_only:
        query = query.where(col(Call.parent_id).is_(None))
    return query


def query_calls(session: Session, project_id: str, q: CallsQuery) -> list[Call]:
    query = _filtered(project_id, q.filter)
    for sort in q.sort_by or [SortBy(field="started_at", direction="asc")]:
        column = col(getattr(Call, sort.field))
        query = query.order_by(column.desc() if sort.direction == "desc" else column.asc())
    query = query.order_by(col(Call.id))
    if q.offset:
        query = query.offset(q.offset)
    if q.limit is not None:
        query = query.limit(q.limit)
    return list(session.exec(query))


def count_calls(session: Session, project_id: str, flt: CallFilter | None) -> int:
    sub = _filtered(project_id, flt).subquery()
    return int(session.execute(sa.select(sa.func.count()).select_from(sub)).scalar_one())


def read_call(session: Session, project_id: str, call_id: str) -> Call | None:
    return session.exec(
        select(Call).where(col(Call.project_id) == project_id, col(Call.id) == call_id)
    ).first()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def call_schema(call: Call, project_ref: str, output: dict[str, Any] | None) -> dict[str, Any]:
    """Weave's CallSchema, with the derived ``summary.weave`` the reference adds on read."""
    if call.ended_at is None:
        status = "running"
    elif call.exception:
        status = "error"
    else:
        status = "success"
    latency = (int((call.ended_at - call.started_at).total_seconds() * 1000)
               if call.ended_at else None)
    summary = {**(call.summary or {}), "weave": {
        "status": status, "trace_name": call.display_name or call.op_name,
        "latency_ms": latency, "display_name": call.display_name,
    }}
    return {
        "id": call.id, "project_id": project_ref, "op_name": call.op_name,
        "display_name": call.display_name, "trace_id": call.trace_id,
        "parent_id": call.parent_id, "thread_id": None, "turn_id": None,
        "started_at": _iso(call.started_at), "attributes": call.attributes or {},
        "inputs": call.inputs or {}, "ended_at": _iso(call.ended_at),
        "exception": call.exception, "output": output, "summary": summary,
        "wb_user_id": call.wb_user_id, "wb_run_id": None, "wb_run_step": None,
        "wb_run_step_end": None, "deleted_at": None, "storage_size_bytes": None,
        "total_storage_size_bytes": None,
    }


def jsonl(rows: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    for row in rows:
        yield json.dumps(row).encode() + b"\n"
