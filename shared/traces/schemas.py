from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from sqlmodel import Field

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
