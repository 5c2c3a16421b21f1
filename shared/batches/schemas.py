"""Wire shapes of batches (OpenAI's Batch object) and their lines."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.batches.models import BatchStatus, ItemStatus
from shared.core.schemas import ListPage


class BatchCreate(BaseModel):
    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=100)
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = None


class NativeBatchCreate(BaseModel):
    """Either ``requests`` (full generation requests, each with an optional
    ``custom_id``) or ``prompts`` with shared parameters."""

    model_config = ConfigDict(extra="allow")  # shared generation parameters

    requests: list[dict[str, Any]] | None = None
    prompts: list[str] | None = None
    webhook_url: str | None = Field(default=None, max_length=2000)
    metadata: dict[str, str] | None = None


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class BatchObject(BaseModel):
    """OpenAI's Batch object (``expiring`` is shown as ``finalizing``)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str | None = None
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, Any] | None = None


class ItemResponse(BaseModel):
    status_code: int
    body: dict[str, Any]


class BatchItemObject(BaseModel):
    """One line with its result: ``response.body`` is the generation (fresh URLs) or
    ``{"error": ...}``; ``error`` alone for a line that never ran."""

    id: str
    custom_id: str
    line: int
    status: ItemStatus
    job_id: str | None = None
    response: ItemResponse | None = None
    error: dict[str, Any] | None = None


class BatchItemPage(ListPage[BatchItemObject]):
    last_line: int | None = None
