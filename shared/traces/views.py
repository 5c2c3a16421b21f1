"""Rendering trace calls in Weave's CallSchema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlmodel import Session

from shared.core.storage import Storage
from shared.jobs.models import Image, Job
from shared.jobs.service import job_images
from shared.jobs.views import render_result
from shared.projects.models import Project
from shared.traces.models import Call


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
    latency = (
        int((call.ended_at - call.started_at).total_seconds() * 1000) if call.ended_at else None
    )
    summary = {
        **(call.summary or {}),
        "weave": {
            "status": status,
            "trace_name": call.display_name or call.op_name,
            "latency_ms": latency,
            "display_name": call.display_name,
        },
    }
    return {
        "id": call.id,
        "project_id": project_ref,
        "op_name": call.op_name,
        "display_name": call.display_name,
        "trace_id": call.trace_id,
        "parent_id": call.parent_id,
        "thread_id": None,
        "turn_id": None,
        "started_at": _iso(call.started_at),
        "attributes": call.attributes or {},
        "inputs": call.inputs or {},
        "ended_at": _iso(call.ended_at),
        "exception": call.exception,
        "output": output,
        "summary": summary,
        "wb_user_id": call.wb_user_id,
        "wb_run_id": None,
        "wb_run_step": None,
        "wb_run_step_end": None,
        "deleted_at": None,
        "storage_size_bytes": None,
        "total_storage_size_bytes": None,
    }


def jsonl(rows: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    for row in rows:
        yield json.dumps(row).encode() + b"\n"


def _call_output(
    call: Call,
    storage: Storage,
    base_url: str,
    expiry: int,
    jobs: dict[str, tuple[Job, list[Image]]],
    retention: dict[str, int | None],
) -> dict[str, Any] | None:
    """The stored output, with image URLs made fresh (never b64 blobs in traces), an
    image past its life an ``expired`` marker (its object deleted: never presigned)."""
    if call.output is None or call.job_id not in jobs:
        return call.output
    job, images = jobs[call.job_id]
    job_as_url = job.model_copy(update={"request": {**job.request, "response_format": "url"}})
    data = render_result(
        job_as_url,
        images,
        storage,
        base_url,
        expiry,
        retention_seconds=retention.get(job.project_id),
    ).data
    return {**call.output, "data": [d.model_dump(exclude_none=True) for d in data]}


def render_calls(
    session: Session,
    calls: list[Call],
    project_ref: str,
    storage: Storage,
    base_url: str,
    expiry: int,
) -> list[dict[str, Any]]:
    """Calls as Weave's CallSchema, each output with its job's images (fresh URLs)."""
    jobs: dict[str, tuple[Job, list[Image]]] = {}
    retention: dict[str, int | None] = {}
    for call in calls:
        if call.job_id and call.output is not None:
            job = session.get(Job, call.job_id)
            if job is not None and job.project_id == call.project_id:
                jobs[call.job_id] = (job, job_images(session, job))
                if job.project_id not in retention:
                    project = session.get(Project, job.project_id)
                    retention[job.project_id] = project.image_retention_seconds if project else None
    return [
        call_schema(c, project_ref, _call_output(c, storage, base_url, expiry, jobs, retention))
        for c in calls
    ]
