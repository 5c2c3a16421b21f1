from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict
from sqlmodel import Field

from shared.core.schemas import Schema

MAX_FILTER_IDS = 10_000


INT64_MAX = 2**63 - 1  # LIMIT and OFFSET are bigint


class CallFilter(Schema):
    """Which calls: every list given must match (an AND of ORs)."""

    model_config = ConfigDict(extra="ignore")

    # Each list becomes one bound parameter per item; PostgreSQL takes at most 65,535
    # in one statement, so five full lists still fit.
    op_names: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    """Op names (``weave.image_generation_create``, ``openai.images.generate``)."""
    call_ids: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    """Call ids."""
    trace_ids: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    """Trace ids."""
    parent_ids: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    """Parent call ids."""
    wb_user_ids: list[str] | None = Field(default=None, max_length=MAX_FILTER_IDS)
    """The ``user`` of the keys that made the calls."""
    trace_roots_only: bool | None = None
    """Only calls without a parent."""


class SortBy(Schema):
    """One sort key."""

    field: Literal["started_at", "ended_at", "op_name", "id", "display_name", "trace_id"]
    """The column to sort by."""
    direction: Literal["asc", "desc"] = "asc"
    """``asc`` or ``desc``."""


class CallsQuery(Schema):
    """``POST /calls/stream_query``: the project's calls as JSON lines."""

    model_config = ConfigDict(extra="ignore")

    project_id: str
    """The project's name (Weave's ``entity/project``) or id; the key must own it."""
    filter: CallFilter | None = None
    """Which calls; all of the project's when null."""
    limit: int | None = Field(default=None, ge=0, le=INT64_MAX)
    """At most this many calls."""
    offset: int | None = Field(default=None, ge=0, le=INT64_MAX)
    """Skip this many calls first."""
    sort_by: list[SortBy] | None = None
    """Sort keys, in order; ``started_at`` ascending when null."""
