"""Wire shapes of batches (OpenAI's Batch object) and their lines."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from shared.batches.models import BatchStatus, ItemStatus
from shared.core.schemas import ListPage, Schema


class ExpiresAfter(Schema):
    """OpenAI's expiration policy for a batch's output and error files."""

    anchor: Literal["created_at"]
    """``created_at``: counted from the file's creation (OpenAI's only anchor)."""
    seconds: int = Field(ge=3600, le=2592000)
    """Seconds after the anchor the file expires: one hour to 30 days."""


class BatchCreate(Schema):
    """``POST /v1/batches``: OpenAI's Batch API over an uploaded JSONL file."""

    input_file_id: str = Field(max_length=64)
    """A file uploaded with purpose ``batch``: one request per line, each with a
    ``custom_id``, ``method: POST``, the ``url`` and a ``body``."""
    endpoint: str = Field(max_length=100)
    """``/v1/images/generations`` or ``/v1/images/edits``."""
    completion_window: str = Field(max_length=16)
    """Always ``24h``: lines not done by then are given up (``batch_expired``)."""
    metadata: dict[str, str] | None = None
    """Your own labels, returned on the batch."""
    output_expires_after: ExpiresAfter | None = None
    """When its output and error files expire (their ``expires_at``); without it, at
    the project's file retention (null: kept until deleted)."""


class NativeBatchCreate(Schema):
    """Either ``requests`` (full generation requests, each with an optional
    ``custom_id``) or ``prompts`` with shared parameters."""

    model_config = ConfigDict(extra="allow")  # shared generation parameters

    requests: list[dict[str, Any]] | None = None
    """Generation requests, one per line, each as ``POST /v1/images/generations``
    takes it, with an optional ``custom_id``."""
    prompts: list[str] | None = None
    """Prompts, one per line; the other fields of this body (``model``, ``size``,
    ``n``, ...) apply to each."""
    webhook_url: str | None = Field(default=None, max_length=2000)
    """A URL that receives the batch's end event, signed as a per-job webhook."""
    metadata: dict[str, str] | None = None
    """Your own labels, returned on the batch."""
    cancel_after: str | None = Field(default=None, max_length=32)
    """Each line's deadline, as the ``Cancel-After`` header takes it (``30s``, ``5m``,
    ``1h30m``; 5 s to 24 h), counted from when the line starts (its job is made): a
    line not finished by then ends ``canceled`` with ``deadline_exceeded`` and is not
    charged. A request's own ``cancel_after`` overrides it for that line."""


class RequestCounts(Schema):
    """How many lines the batch has, and how many ended."""

    total: int
    """Lines in all."""
    completed: int
    """Lines that succeeded."""
    failed: int
    """Lines that failed (or were canceled, or expired)."""


class BatchErrors(Schema):
    """Lines refused while validating the input file."""

    object: Literal["list"] = "list"
    """Always ``list``."""
    data: list[dict[str, Any]]
    """Each with ``code``, ``message``, ``param`` and ``line``."""


class BatchObject(Schema):
    """OpenAI's Batch object (``expiring`` is shown as ``finalizing``)."""

    id: str
    """The batch's id (``batch_...``)."""
    object: Literal["batch"] = "batch"
    """Always ``batch``."""
    endpoint: str
    """The endpoint every line calls."""
    errors: BatchErrors | None = None
    """Lines refused while validating, if any."""
    input_file_id: str | None = None
    """The input file (Batch API); null for a native batch."""
    completion_window: str
    """``24h``."""
    status: BatchStatus
    """``validating``, ``in_progress``, ``finalizing``, then ``completed``,
    ``failed``, ``expired`` or ``cancelled`` (via ``cancelling``)."""
    output_file_id: str | None = None
    """Once finished: a JSONL file with one line per succeeded request."""
    error_file_id: str | None = None
    """Once finished: a JSONL file with one line per failed request."""
    created_at: int
    """Unix seconds."""
    in_progress_at: int | None = None
    """When its lines started to run, Unix seconds."""
    expires_at: int | None = None
    """When the completion window closes, Unix seconds."""
    finalizing_at: int | None = None
    """When its output files started to be written, Unix seconds."""
    completed_at: int | None = None
    """Unix seconds."""
    failed_at: int | None = None
    """Unix seconds."""
    expired_at: int | None = None
    """Unix seconds."""
    cancelling_at: int | None = None
    """Unix seconds."""
    cancelled_at: int | None = None
    """Unix seconds."""
    request_counts: RequestCounts
    """Progress: lines in all, succeeded and failed."""
    metadata: dict[str, Any] | None = None
    """Your own labels."""
    cost_usd: float | None = None
    """What its lines have cost so far in USD, by the models' ``price``; absent
    while none of them has a price."""


class ItemResponse(Schema):
    """A line's answer, as the endpoint would have given it."""

    status_code: int
    """The HTTP status the request would have had."""
    body: dict[str, Any]
    """The generation (``ImagesResponse``) or ``{"error": ...}``."""


class BatchItemObject(Schema):
    """One line with its result: ``response.body`` is the generation (fresh URLs) or
    ``{"error": ...}``; ``error`` alone for a line that never ran."""

    id: str
    """The line's id."""
    custom_id: str
    """The ``custom_id`` the line was given (or one made from its number)."""
    line: int
    """The line's number in the batch, from 1."""
    prompt: str | None = None
    """The line's prompt (null for a variation)."""
    status: ItemStatus
    """``pending``, ``queued``, then ``succeeded``, ``failed`` or ``canceled``."""
    job_id: str | None = None
    """The job running the line, once made."""
    response: ItemResponse | None = None
    """The line's answer, once its job ended."""
    error: dict[str, Any] | None = None
    """Why the line never ran (refused, the batch cancelled or expired)."""


class BatchItemPage(ListPage[BatchItemObject]):
    """A page of a batch's lines, in line order."""

    last_line: int | None = None
    """The last line on this page: pass it as ``after`` for the next page."""
