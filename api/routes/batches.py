"""Batches: OpenAI's ``/v1/batches`` and the native ``/v1/images/batches``."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from api import openapi
from api.deps import (
    After,
    CurrentPrincipal,
    DbSession,
    IdempotencyClaims,
    StorageDep,
    StorageRoom,
)
from api.errors import ERRORS
from api.sse import Frame, event_stream
from shared.batches.models import TERMINAL
from shared.batches.schemas import (
    BatchCreate,
    BatchItemPage,
    BatchObject,
    NativeBatchCreate,
)
from shared.batches.service import (
    cancel_batch,
    create_native_batch,
    create_openai_batch,
    delete_batch,
    get_batch,
    list_batches,
)
from shared.batches.views import list_items, render_batch
from shared.core.db import unit_of_work
from shared.core.errors import InvalidRequest
from shared.core.schemas import Deleted, ListPage
from shared.idempotency.service import once
from shared.webhooks.service import check_url

router = APIRouter(tags=["batches"])


@router.post(
    "/v1/batches", response_model=BatchObject, responses=ERRORS, dependencies=[StorageRoom]
)
def post_batch(
    body: BatchCreate,
    principal: CurrentPrincipal,
    session: DbSession,
    claims: IdempotencyClaims,
) -> BatchObject:
    claim = claims(body.model_dump(mode="json"))

    def create() -> str:
        return create_openai_batch(
            session,
            principal,
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            output_expires_after_seconds=(
                body.output_expires_after.seconds if body.output_expires_after else None
            ),
        ).id

    batch_id = once(session, principal.project_id, claim, "batch", create)
    return render_batch(session, get_batch(session, principal.project_id, batch_id))


@router.get("/v1/batches", response_model=ListPage[BatchObject], responses=ERRORS)
def get_batches(
    principal: CurrentPrincipal,
    session: DbSession,
    limit: Annotated[int, Query(ge=1, le=100, description="Objects per page")] = 20,
    after: After = None,
) -> ListPage[BatchObject]:
    rows, has_more = list_batches(session, principal.project_id, limit=limit, after=after)
    return ListPage.of([render_batch(session, b) for b in rows], has_more)


@router.get("/v1/batches/{batch_id}", response_model=BatchObject, responses=ERRORS)
@router.get("/v1/images/batches/{batch_id}", response_model=BatchObject, responses=ERRORS)
def get_one_batch(batch_id: str, principal: CurrentPrincipal, session: DbSession) -> BatchObject:
    return render_batch(session, get_batch(session, principal.project_id, batch_id))


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject, responses=ERRORS)
@router.post("/v1/images/batches/{batch_id}/cancel", response_model=BatchObject, responses=ERRORS)
def post_cancel(batch_id: str, principal: CurrentPrincipal, session: DbSession) -> BatchObject:
    """``cancelling`` at once; the worker finalizes it to ``cancelled`` as soon as no
    line is running."""
    return render_batch(session, cancel_batch(session, principal.project_id, batch_id))


@router.delete("/v1/batches/{batch_id}", response_model=Deleted, responses=ERRORS)
@router.delete("/v1/images/batches/{batch_id}", response_model=Deleted, responses=ERRORS)
def delete_one_batch(
    batch_id: str, principal: CurrentPrincipal, session: DbSession, storage: StorageDep
) -> Deleted:
    """Delete an ended batch (409 ``conflict`` while it runs: cancel it first): its
    jobs' images and inputs and its input, output and error files are removed at
    once; from then on the batch, its jobs and files answer 404 (a second delete
    too)."""
    return delete_batch(session, storage, principal.project_id, batch_id, principal.key_id)


@router.post(
    "/v1/images/batches", response_model=BatchObject, responses=ERRORS, dependencies=[StorageRoom]
)
async def post_native_batch(
    body: NativeBatchCreate,
    principal: CurrentPrincipal,
    session: DbSession,
    claims: IdempotencyClaims,
) -> BatchObject:
    claim = claims(body.model_dump(mode="json"))
    if (body.requests is None) == (body.prompts is None):
        raise InvalidRequest("Give either 'requests' or 'prompts'.", param="requests")
    shared = body.model_extra or {}
    requests = (
        body.requests
        if body.requests is not None
        else [{**shared, "prompt": p} for p in body.prompts or []]
    )
    if body.webhook_url is not None:
        await run_in_threadpool(check_url, body.webhook_url, "webhook_url")  # resolves DNS

    def create() -> BatchObject:
        batch_id = once(
            session,
            principal.project_id,
            claim,
            "batch",
            lambda: (
                create_native_batch(
                    session, principal, requests, body.webhook_url, body.metadata, body.cancel_after
                ).id
            ),
        )
        return render_batch(session, get_batch(session, principal.project_id, batch_id))

    return await run_in_threadpool(create)


@router.get("/v1/images/batches/{batch_id}/items", response_model=BatchItemPage, responses=ERRORS)
def get_items(
    batch_id: str,
    principal: CurrentPrincipal,
    session: DbSession,
    limit: Annotated[int, Query(ge=1, le=1000, description="Objects per page")] = 100,
    after: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="last line seen")] = None,
) -> BatchItemPage:
    batch = get_batch(session, principal.project_id, batch_id)
    return list_items(session, batch, limit=limit, after=after)


BATCH_EVENTS = {
    **openapi.event_stream(
        "`batch.progress` at most twice a second, then `batch.completed`, "
        "`batch.failed`, `batch.expired` or `batch.cancelled`; each `data` is the batch"
    ),
    **ERRORS,
}


@router.get("/v1/batches/{batch_id}/events", response_class=Response, responses=BATCH_EVENTS)
@router.get("/v1/images/batches/{batch_id}/events", response_class=Response, responses=BATCH_EVENTS)
async def batch_events(
    batch_id: str, request: Request, principal: CurrentPrincipal
) -> StreamingResponse:
    """Server-sent progress: ``event: batch.progress`` with the batch object, at most
    twice a second, until the batch ends (its last event names the final status)."""

    def snapshot() -> Frame:
        # A stream outlives any one transaction: each snapshot reads in its own.
        with unit_of_work() as session:
            batch = render_batch(session, get_batch(session, principal.project_id, batch_id))
        final = batch.status in TERMINAL
        return Frame(
            name=f"batch.{batch.status}" if final else "batch.progress",
            data=batch.model_dump(mode="json"),
            state=(batch.status, json.dumps(batch.request_counts.model_dump())),
            final=final,
        )

    first = await run_in_threadpool(snapshot)
    # Lines finish in bursts: fold each burst into one event.
    return event_stream(
        request.app.state.waiter,
        batch_id,
        first,
        snapshot,
        coalesce=0.5,
        owner=principal.key_id,
    )
