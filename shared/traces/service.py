"""Trace calls in Weave's shapes: one per tracked generation, on both surfaces.

The API opens the call in the same transaction that records the job; the worker
closes it in the same transaction that finishes the job. Outputs are stored
without image URLs and rendered on read with fresh ones, so a call never holds
an expired link.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
import uuid6
from sqlmodel import Session, col, select

from shared.core.clock import utcnow
from shared.core.columns import table
from shared.jobs.models import Job
from shared.traces.models import Call
from shared.traces.schemas import CallFilter, CallsQuery, SortBy

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


def start_call(job: Job, *, op_name: str, inputs: dict[str, Any], wb_user_id: str) -> Call:
    """The job's trace call, made before ``job`` is written: it sets ``job.call_id``,
    so the job is inserted once, never updated. The caller inserts both."""
    call_id = new_call_id()
    call = Call(
        id=call_id,
        trace_id=new_call_id(),
        project_id=job.project_id,
        op_name=op_name,
        inputs=inputs,
        wb_user_id=wb_user_id,
        job_id=job.id,
        attributes={"job_id": job.id, "surface": job.surface},
        started_at=job.created_at,
    )
    job.call_id = call_id
    return call


def finish_call(
    session: Session,
    job: Job,
    *,
    output: dict[str, Any] | None,
    exception: str | None,
    usage: dict[str, Any] | None,
) -> None:
    if not job.call_id:
        return
    summary: dict[str, Any] = {}
    norm = normalise_usage(usage)
    if norm:
        summary["usage"] = {job.model: {"requests": 1, **norm}}
    session.execute(
        _FINISH_CALL,
        {
            "_id": job.call_id,
            "ended_at": utcnow(),
            "output": output,
            "exception": exception,
            "summary": summary,
        },
    )


_CALLS = table(Call)
# Built once, as every statement of a job's path (ARCHITECTURE.md, "A job").
_FINISH_CALL = (
    sa.update(_CALLS)
    .where(_CALLS.c.id == sa.bindparam("_id"), _CALLS.c.ended_at.is_(None))
    .values(
        ended_at=sa.bindparam("ended_at"),
        output=sa.bindparam("output"),
        exception=sa.bindparam("exception"),
        summary=sa.bindparam("summary"),
    )
)


def _filtered(project_id: str, flt: CallFilter | None) -> Any:
    query = select(Call).where(col(Call.project_id) == project_id)
    if flt is None:
        return query
    for values, column in (
        (flt.op_names, Call.op_name),
        (flt.call_ids, Call.id),
        (flt.trace_ids, Call.trace_id),
        (flt.parent_ids, Call.parent_id),
        (flt.wb_user_ids, Call.wb_user_id),
    ):
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


def forget_calls(session: Session, job_ids: Sequence[str]) -> int:
    """Deleted jobs' trace calls removed, as Weave deletes a call: their inputs are
    the requests (prompts), their outputs the images' links, and no Weave query
    shows them again. A late finish of one updates nothing. Returns the rows."""
    if not job_ids:
        return 0
    result = session.execute(sa.delete(Call).where(col(Call.job_id).in_(list(job_ids))))
    return int(result.rowcount)  # type: ignore[attr-defined]
