
from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

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
