"""The Weave trace server surface: ``/image/create`` and reading calls.

Shapes follow the reference server: schema errors answer 422
``HTTPValidationError``; provider and request failures answer 200 with
``{"response": {"error": ...}, "weave_call_id": null}`` and are still recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ConfigDict, Field, StrictBool, StrictInt, StrictStr

from api import openapi
from api.deps import DbSession, Links, SettingsDep, WeavePrincipal, WeaveStorageRoom
from api.generation import submit, webhook_for
from shared.core.db import unit_of_work
from shared.core.errors import Forbidden, ImagegenError, quoted
from shared.core.schemas import Schema
from shared.jobs.input import parse_request, validate_generation
from shared.jobs.models import JobStatus
from shared.jobs.schemas import ImageGenerationRequest
from shared.jobs.submission import Submission
from shared.projects.service import Principal
from shared.registry import get_registry
from shared.traces.schemas import CallFilter, CallsQuery
from shared.traces.service import OP_WEAVE, count_calls, normalise_usage, query_calls, read_call
from shared.traces.views import jsonl, render_calls

router = APIRouter(tags=["weave"])


class ImageGenerationRequestInputs(Schema):
    """The generation request, as ``POST /v1/images/generations`` takes it."""

    # Extra keys OpenAI knows (size, quality, ...) are honoured, others ignored.
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    """A model from ``GET /v1/models``."""
    prompt: StrictStr
    """What to draw."""
    n: StrictInt | None = None
    """How many images; 1 when null."""


class ImageGenerationCreateReq(Schema):
    """``POST /image/create``, as the Weave trace server takes it."""

    model_config = ConfigDict(extra="ignore")

    project_id: StrictStr
    """The project's name (``entity/project``) or id; the key must own it."""
    inputs: ImageGenerationRequestInputs
    """The generation request."""
    wb_user_id: StrictStr | None = Field(
        default=None,
        description="Do not set directly. Server will automatically populate this field.",
    )
    track_llm_call: StrictBool | None = True
    """Record the call as a trace (``POST /call/read`` reads it back)."""
    webhook_url: StrictStr | None = Field(default=None, max_length=2000)
    """Extension, as on the OpenAI surface: a per-job webhook."""
    webhook_events: list[StrictStr] | None = None
    """Extension: which job events ``webhook_url`` receives; all when null."""


class WeaveError(Schema):
    """The Weave surface's error answer."""

    detail: str
    """What went wrong."""


WEAVE_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": WeaveError, "description": desc}
    for code, desc in [
        (400, "The body could not be parsed"),
        (401, "Missing or invalid API key"),
        (403, "The key may not use this project"),
        (429, "Rate limited"),
        (503, "Service unavailable"),
    ]
}


class ImageGenerationCreateRes(Schema):
    """The answer to ``POST /image/create``."""

    response: dict[str, Any]
    """OpenAI's images answer (``created``, ``data``, ``usage``), or ``{"error": ...}``
    when the generation failed (the call is still recorded)."""
    weave_call_id: str | None = None
    """The trace call's id when tracked; null on failure."""


class CallReadReq(Schema):
    """``POST /call/read``."""

    model_config = ConfigDict(extra="ignore")

    project_id: StrictStr
    """The project's name (``entity/project``) or id."""
    id: StrictStr
    """The call's id."""


class CallReadRes(Schema):
    """The answer to ``POST /call/read``."""

    call: dict[str, Any] | None
    """The call (inputs, output with fresh image URLs, summary, timings); null when
    the project has no such call."""


class CallsQueryStatsReq(Schema):
    """``POST /calls/query_stats``."""

    model_config = ConfigDict(extra="ignore")

    project_id: StrictStr
    """The project's name (``entity/project``) or id."""
    filter: CallFilter | None = None
    """Which calls; all of the project's when null."""


class CallsQueryStatsRes(Schema):
    """The answer to ``POST /calls/query_stats``."""

    count: int
    """How many calls match."""


def _check_project(principal: Principal, project_ref: str) -> None:
    if not principal.owns_project(project_ref):
        raise Forbidden(f"This API key may not use project '{quoted(project_ref)}'.")


def _failure(message: str) -> ImageGenerationCreateRes:
    return ImageGenerationCreateRes(response={"error": message}, weave_call_id=None)


@router.post(
    "/image/create",
    response_model=ImageGenerationCreateRes,
    summary="Image Create",
    responses=WEAVE_ERRORS,
    dependencies=[WeaveStorageRoom],
)
async def image_create(
    body: Annotated[ImageGenerationCreateReq, Body()],
    request: Request,
    principal: WeavePrincipal,
    settings: SettingsDep,
    links: Links,
) -> ImageGenerationCreateRes:
    _check_project(principal, body.project_id)
    inputs = body.inputs.model_dump(exclude_none=True)
    known = {k: v for k, v in inputs.items() if k in ImageGenerationRequest.model_fields}
    try:
        params = validate_generation(parse_request(known), get_registry())
        webhook = await webhook_for(body)
    except ImagegenError as exc:  # as the reference: the provider would refuse it
        return _failure(exc.message)
    submission = Submission(
        principal,
        params,
        get_registry().get(params.model),
        surface="weave",
        track=body.track_llm_call is not False,
        op_name=OP_WEAVE,
        # The adapters as applied (default scales filled in), beside what was sent.
        call_inputs={**inputs, "lora": [c.model_dump() for c in params.lora]}
        if params.lora
        else inputs,
        webhook=webhook,
    )
    outcome = await submit(request, submission, settings.sync_wait_seconds)
    job = outcome.job
    if not outcome.finished:
        return ImageGenerationCreateRes(
            response={
                "error": f"The generation is still running; poll job {job.id}.",
                "job_id": job.id,
            },
            weave_call_id=job.call_id,
        )
    if job.status != JobStatus.succeeded:
        return _failure(job.error_message or f"The generation {job.status}.")
    result = await outcome.result(
        links.storage, links.base_url, links.expiry, principal.image_retention_seconds
    )
    response = result.model_dump(exclude_none=True)
    response["model"] = job.model
    usage = normalise_usage(job.usage)
    if usage:
        response["usage"] = usage
    return ImageGenerationCreateRes(response=response, weave_call_id=job.call_id)


@router.post("/call/read", response_model=CallReadRes, summary="Call Read", responses=WEAVE_ERRORS)
def call_read(
    body: CallReadReq,
    principal: WeavePrincipal,
    session: DbSession,
    links: Links,
) -> CallReadRes:
    _check_project(principal, body.project_id)
    call = read_call(session, principal.project_id, body.id)
    if call is None:
        return CallReadRes(call=None)
    rendered = render_calls(
        session, [call], body.project_id, links.storage, links.base_url, links.expiry
    )
    return CallReadRes(call=rendered[0])


@router.post(
    "/calls/stream_query",
    summary="Calls Query Stream",
    response_class=Response,
    responses={**openapi.answer("application/jsonl", "One call per line"), **WEAVE_ERRORS},
)
def calls_stream_query(
    body: CallsQuery,
    principal: WeavePrincipal,
    session: DbSession,
    links: Links,
) -> StreamingResponse:
    _check_project(principal, body.project_id)
    calls = query_calls(session, principal.project_id, body)

    def rows() -> Iterator[dict[str, Any]]:
        # Rendered a page at a time so a large answer never sits whole in memory; the
        # stream outlives the request's transaction, so each page reads in its own.
        for start in range(0, len(calls), 100):
            with unit_of_work() as page_session:
                yield from render_calls(
                    page_session,
                    calls[start : start + 100],
                    body.project_id,
                    links.storage,
                    links.base_url,
                    links.expiry,
                )

    return StreamingResponse(jsonl(rows()), media_type="application/jsonl")


@router.post(
    "/calls/query_stats",
    response_model=CallsQueryStatsRes,
    summary="Calls Query Stats",
    responses=WEAVE_ERRORS,
)
def calls_query_stats(
    body: CallsQueryStatsReq, principal: WeavePrincipal, session: DbSession
) -> CallsQueryStatsRes:
    _check_project(principal, body.project_id)
    return CallsQueryStatsRes(count=count_calls(session, principal.project_id, body.filter))
