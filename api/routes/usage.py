"""``GET /v1/usage``: the caller's project, by UTC day and model."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentPrincipal, DbSession
from api.errors import ERRORS
from shared.projects.budgets import statuses
from shared.retention.service import retention_of
from shared.usage import UsageReport, storage_usage, usage_report

router = APIRouter(tags=["usage"])
# Days a report may name: no job predates 1970, and the day after the last must
# still be a date (9999-12-31 overflowed computing the report's end).
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(9999, 12, 30)


@router.get("/v1/usage", response_model=UsageReport, responses=ERRORS)
def read_usage(
    principal: CurrentPrincipal,
    session: DbSession,
    start_date: Annotated[
        date | None,
        Query(
            ge=FIRST_DAY,
            le=LAST_DAY,
            description="First UTC day; 29 days before end_date when absent",
        ),
    ] = None,
    end_date: Annotated[
        date | None,
        Query(ge=FIRST_DAY, le=LAST_DAY, description="Last UTC day, included; today when absent"),
    ] = None,
) -> UsageReport:
    end = end_date or datetime.now(UTC).date()
    start = start_date or end - timedelta(days=29)
    report = usage_report(session, principal.project_id, principal.project_name, start, end)
    report.budgets = statuses(session, principal)
    storage = storage_usage(session, principal.project_id)
    report.storage = storage
    report.storage_bytes = storage.images_bytes + storage.inputs_bytes + storage.files_bytes
    report.storage_quota_bytes = principal.storage_quota_bytes
    report.retention = retention_of(session, principal.project_id)
    return report
