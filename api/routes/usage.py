"""``GET /v1/usage``: the caller's project, by UTC day and model."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import CurrentPrincipal
from api.routes.images import ERRORS
from shared.db import session_scope
from shared.usage import usage_report

router = APIRouter(tags=["usage"])


@router.get("/v1/usage", responses=ERRORS)
def read_usage(principal: CurrentPrincipal,
               start_date: Annotated[date | None, Query()] = None,
               end_date: Annotated[date | None, Query()] = None) -> dict[str, Any]:
    end = end_date or datetime.now(UTC).date()
    start = start_date or end - timedelta(days=29)
    with session_scope() as session:
        report = usage_report(session, principal.project_id, start, end)
    return {"project": principal.project_name, **report}
