"""Batches: OpenAI's ``/v1/batches`` and the native ``/v1/images/batches``."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CurrentPrincipal
from api.routes.images import ERRORS
from api.sse import Frame, event_stream
from shared.batches.pump import pump
from shared.batches.service import (
    cancel_batch,
    create_native_batch,
    create_openai_batch,
    get_batch,
    list_batches,
)
from shared.batches.views import list_items, render_batch
from shared.core.broker import publish_batch_validation
from shared.core.db import session_scope
from shared.core.errors import InvalidRequest
from shared.webhooks.service import check_url

router = APIRouter(tags=["batches"])
TERMINAL = ("completed", "failed", "expired", "cancelled")


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


@router.post("/v1/batches", responses=ERRORS)
def post_batch(body: BatchCreate, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        batch = create_openai_batch(session, principal, input_file_id=body.input_file_id,
                                    endpoint=body.endpoint,
                                    completion_window=body.completion_window,
                                    metadata=body.metadata)
        view = render_batch(session, batch)
    publish_batch_validation(batch.id)  # if lost: the sweeper validates it
    return view


@router.get("/v1/batches", responses=ERRORS)
def get_batches(principal: CurrentPrincipal,
                limit: Annotated[int, Query(ge=1, le=100)] = 20,
                after: Annotated[str | None, Query(max_length=64)] = None) -> dict[str, Any]:
    with session_scope() as session:
        rows, has_more = list_batches(session, principal.project_id, limit=limit, after=after)
        data = [render_batch(session, b) for b in rows]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/v1/batches/{batch_id}", responses=ERRORS)
@router.get("/v1/images/batches/{batch_id}", responses=ERRORS)
def get_one_batch(batch_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        return render_batch(session, get_batch(session, principal.project_id, batch_id))


@router.post("/v1/batches/{batch_id}/cancel", responses=ERRORS)
@router.post("/v1/images/batches/{batch_id}/cancel", responses=ERRORS)
def post_cancel(batch_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        batch = cancel_batch(session, principal.project_id, batch_id)
        view = render_batch(session, batch)
    pump(batch_id)  # finalizes at once when nothing is running
    return view


@router.post("/v1/images/batches", responses=ERRORS)
async def post_native_batch(body: NativeBatchCreate,
                            principal: CurrentPrincipal) -> dict[str, Any]:
    if (body.requests is None) == (body.prompts is None):
        raise InvalidRequest("Give either 'requests' or 'prompts'.", param="requests")
    shared = body.model_extra or {}
    requests = (body.requests if body.requests is not None
                else [{**shared, "prompt": p} for p in body.prompts or []])
    if body.webhook_url is not None:
        await run_in_threadpool(check_url, body.webhook_url, "webhook_url")

    def create() -> dict[str, Any]:
        with session_scope() as session:
            batch = create_native_batch(session, principal, requests, body.webhook_url,
                                        body.metadata)
            view = render_batch(session, batch)
        pump(batch.id)
        return view

    return await run_in_threadpool(create)


@router.get("/v1/images/batches/{batch_id}/items", responses=ERRORS)
def get_items(batch_id: str, principal: CurrentPrincipal,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              after: Annotated[int | None, Query(ge=0, le=2**31 - 1,
                                                 description="last line seen")] = None,
              ) -> dict[str, Any]:
    with session_scope() as session:
        batch = get_batch(session, principal.project_id, batch_id)
        data, has_more = list_items(session, batch, limit=limit, after=after)
    return {"object": "list", "data": data, "has_more": has_more,
            "last_line": data[-1]["line"] if data else None}


@router.get("/v1/batches/{batch_id}/events",
            responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
@router.get("/v1/images/batches/{batch_id}/events",
            responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def batch_events(batch_id: str, request: Request,
                       principal: CurrentPrincipal) -> StreamingResponse:
    """Server-sent progress: ``event: batch.progress`` with the batch object, at most
    twice a second, until the batch ends (its last event names the final status)."""
    def snapshot() -> Frame:
        with session_scope() as session:
            batch = render_batch(session, get_batch(session, principal.project_id, batch_id))
        final = batch["status"] in TERMINAL
        return Frame(name=f"batch.{batch['status']}" if final else "batch.progress",
                     data=batch, state=(batch["status"], json.dumps(batch["request_counts"])),
                     final=final)

    first = await run_in_threadpool(snapshot)
    # Lines finish in bursts: fold each burst into one event.
    return event_stream(request.app.state.waiter, batch_id, first, snapshot, coalesce=0.5)
