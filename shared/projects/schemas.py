"""Wire shapes of the admin API: projects, their limits, and keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.core.schemas import Schema

INT32_MAX = 2**31 - 1  # the limit columns are SQL INTEGER
INT64_MAX = 2**63 - 1  # storage_quota_bytes is a BIGINT
# The most a budget may be, in USD: counted in micro-USD in Redis, whose Lua numbers
# are exact integers below 2^53.
BUDGET_MAX_USD = 1e9


class Budgets(Schema):
    """Budgets in USD (null: none). A request whose estimated cost the remaining
    budget cannot cover is refused with 429 ``insufficient_quota``; counted in Redis
    (the full stack)."""

    daily_budget_usd: float | None = Field(default=None, ge=0, le=BUDGET_MAX_USD)
    """What may be spent per UTC day, in USD."""
    monthly_budget_usd: float | None = Field(default=None, ge=0, le=BUDGET_MAX_USD)
    """What may be spent per UTC calendar month, in USD."""


class Limits(Budgets):
    """A project's limits: 0 means unlimited, null the service's default
    (``IMAGEGEN_KEY_REQUESTS_PER_MINUTE`` and the like), and its budgets (null: no
    budget). They need Redis (the full stack)."""

    key_requests_per_minute: int | None = Field(default=None, ge=0, le=INT32_MAX)
    """Requests per minute per API key."""
    images_per_day: int | None = Field(default=None, ge=0, le=INT32_MAX)
    """Images per UTC day for the whole project."""
    jobs_in_flight: int | None = Field(default=None, ge=0, le=INT32_MAX)
    """Jobs queued or running at once for the whole project."""
    storage_quota_bytes: int | None = Field(default=None, ge=0, le=INT64_MAX)
    """The bytes the project may keep stored (images, edit inputs, files: its
    ``storage_bytes``); once reached, new work is refused with 429
    ``storage_quota_exceeded``. Null: no quota."""


class Retention(Schema):
    """How long a project's data is kept, in seconds (null: forever, the default);
    the purge deletes what is past it (docs/projects-and-limits.md)."""

    image_retention_seconds: int | None = Field(default=None, ge=60, le=INT32_MAX)
    """Images, with their edit inputs and masks, from when each was made: then
    deleted, their job's entries ``expired``."""
    file_retention_seconds: int | None = Field(default=None, ge=60, le=INT32_MAX)
    """Files (batch inputs, outputs and errors, uploads) from their creation: each
    file's ``expires_at``, fixed when it is made."""
    job_retention_seconds: int | None = Field(default=None, ge=60, le=INT32_MAX)
    """Finished jobs' rows (with their trace calls and webhook deliveries) from their
    creation: then removed (404)."""


class ProjectUpdate(Limits, Retention):
    """``PATCH /v1/admin/projects/{name}``: the fields given change, the rest stay."""


class ProjectCreate(Limits):
    """``POST /v1/admin/projects``."""

    name: str = Field(min_length=1, max_length=200)
    """A unique name; keys and the Weave surface's ``project_id`` refer to it."""


class KeyCreate(Budgets):
    """``POST /v1/admin/keys``: the key's own budgets count what its requests cost,
    beside its project's."""

    project: str = Field(min_length=1, max_length=200)
    """The project the key acts for."""
    name: str = Field(default="default", max_length=200)
    """A label for people."""
    user: str = Field(default="", max_length=200)
    """Who holds it; recorded as ``wb_user_id`` on the Weave surface's traces."""


class ProjectObject(Schema):
    """A project: every job, batch, file and webhook belongs to one."""

    id: str
    """The project's id (``proj_...``)."""
    object: Literal["project"] = "project"
    """Always ``project``."""
    name: str
    """Its unique name."""
    created_at: int
    """Unix seconds."""
    key_requests_per_minute: int | None = None
    """Requests per minute per API key; 0 for unlimited, null for the service's default."""
    images_per_day: int | None = None
    """Images per UTC day; 0 for unlimited, null for the service's default."""
    jobs_in_flight: int | None = None
    """Jobs queued or running at once; 0 for unlimited, null for the service's default."""
    daily_budget_usd: float | None = None
    """USD per UTC day; null for no budget."""
    monthly_budget_usd: float | None = None
    """USD per UTC month; null for no budget."""
    storage_quota_bytes: int | None = None
    """Bytes it may keep stored before new work is refused; null for no quota."""
    image_retention_seconds: int | None = None
    """Seconds its images (and edit inputs) are kept; null: forever."""
    file_retention_seconds: int | None = None
    """Seconds its files are kept (from each one's creation); null: forever."""
    job_retention_seconds: int | None = None
    """Seconds its finished jobs' rows are kept; null: forever."""


class KeyObject(Schema):
    """An API key, without the key itself (only its hash is stored)."""

    id: str
    """The key's id (``key_...``): what ``revoke`` takes."""
    object: Literal["api_key"] = "api_key"
    """Always ``api_key``."""
    name: str
    """Its label."""
    user: str
    """Who holds it."""
    prefix: str
    """The key's first characters, to recognise it by."""
    project: str
    """The name of the project it acts for."""
    created_at: int
    """Unix seconds."""
    last_used_at: int | None = None
    """When it last authenticated a request, to the minute, Unix seconds."""
    revoked_at: int | None = None
    """When it was revoked (it authenticates nothing after), Unix seconds."""
    daily_budget_usd: float | None = None
    """The key's own USD per UTC day (beside its project's); null for none."""
    monthly_budget_usd: float | None = None
    """The key's own USD per UTC month; null for none."""


class CreatedKey(KeyObject):
    """A new key: ``key`` appears in this answer only; only its hash is stored."""

    key: str
    """The secret key (``sk-ig-...``): keep it, it is never shown again."""


class BudgetStatus(Schema):
    """One budget as it stands (``GET /v1/usage``'s ``budgets``), in USD."""

    scope: Literal["project", "key"]
    """Whose: the project's, or the calling key's own."""
    period: Literal["day", "month"]
    """The UTC day or calendar month it counts."""
    period_start: str
    """The period's first day, ``YYYY-MM-DD``."""
    resets_at: int
    """When the next period starts, Unix seconds."""
    budget_usd: float | None = None
    """The budget; null for none (the project's spend is shown anyway)."""
    spent_usd: float
    """What jobs that ended in the period cost."""
    reserved_usd: float
    """What jobs in flight are estimated to cost (settled at their real cost)."""
    remaining_usd: float | None = None
    """``budget_usd`` less spent and reserved, at least 0; null without a budget."""


class DeploymentHealth(Schema):
    """``GET /v1/admin/deployments``: one deployment of a model."""

    model: str
    """The registry's model."""
    deployment: str
    """The deployment's ``id`` (the model's name where it has no deployments)."""
    weight: float
    """Its share of the model's calls."""
    images_per_minute: int | None = None
    """Its declared limit (not enforced yet)."""
    max_concurrency: int | None = None
    """Its declared limit (not enforced yet)."""
    cooling: bool
    """Cooling down after a failure: the model's calls go elsewhere meanwhile."""
