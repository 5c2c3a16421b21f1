"""``POST /v1/images/generations``: validate, record, enqueue, then wait or answer 202."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api import openapi
from api.deps import (
    Claims,
    CurrentPrincipal,
    IdempotencyClaims,
    ImageLinks,
    Links,
    SettingsDep,
    StorageRoom,
)
from api.generation import check_budget, position, submit, webhook_for
from api.streaming import stream_response
from shared.core.ids import new_id
from shared.core.settings import Settings
from shared.idempotency.service import Claim
from shared.jobs.input import validate_generation
from shared.jobs.models import JobStatus
from shared.jobs.schemas import (
    GenerationParams,
    ImageGenerationRequest,
    ImagesResponse,
    JobObject,
)
from shared.jobs.service import cancel_after as parse_cancel_after
from shared.jobs.submission import Submission
from shared.jobs.views import job_failure, render_job
from shared.projects.service import Principal
from shared.registry import get_registry
from shared.retention.policy import request_image_life
from shared.webhooks.service import Webhook

router = APIRouter(tags=["images"])


@dataclass(frozen=True)
class Answering:
    """How an image request is answered: the service's settings, how its images are
    linked, what the client prefers (``Prefer: respond-async`` or ``wait=N``) and
    its Idempotency-Key (generations, edits and variations alike)."""

    settings: Settings
    links: ImageLinks
    prefer: str | None
    claims: Claims
    response: Response
    """The answer's headers (FastAPI merges them into what the route returns)."""
    cancel_after: float | None = None
    """The ``Cancel-After`` header in seconds: the job's deadline from now."""
    image_expires_after: str | None = None
    """The ``Image-Expires-After`` header as sent (checked against the project's
    retention once the caller is known)."""


async def answering(
    settings: SettingsDep,
    links: Links,
    claims: IdempotencyClaims,
    response: Response,
    prefer: Annotated[str | None, Header()] = None,
    cancel_after: Annotated[
        str | None,
        Header(
            description="A duration (`30s`, `5m`, `1h30m`; 5 s to 24 h): not finished by "
            "then, the job ends `canceled` with `deadline_exceeded` and is not charged"
        ),
    ] = None,
    image_expires_after: Annotated[
        str | None,
        Header(
            description="A duration (`30s`, `5m`, `1h30m`; at least 1 minute): the images "
            "are deleted that long after the request (capped at the project's image "
            "retention), their entries then `expired`"
        ),
    ] = None,
) -> Answering:
    return Answering(
        settings,
        links,
        prefer,
        claims,
        response,
        parse_cancel_after(cancel_after),
        image_expires_after,
    )


HowToAnswer = Annotated[Answering, Depends(answering)]

COST_HEADER = "x-imagegen-cost-usd"
_WAIT = re.compile(r"\bwait\s*=\s*(\d+(?:\.\d+)?)")


def parse_prefer(prefer: str | None, default_wait: float) -> tuple[bool, float]:
    """``Prefer: respond-async`` and ``Prefer: wait=N`` (RFC 7240, as Replicate uses)."""
    if not prefer:
        return False, default_wait
    lowered = prefer.lower()
    respond_async = "respond-async" in lowered
    match = _WAIT.search(lowered)
    wait = min(float(match.group(1)), default_wait) if match else default_wait
    return respond_async, wait


def accepted(job: JobObject) -> JSONResponse:
    return JSONResponse(
        job.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/images/jobs/{job.id}"},
    )


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=openapi.IMAGE_ANSWERS,
    summary="Create image",
    dependencies=[StorageRoom],
)
async def create_image(
    body: ImageGenerationRequest, request: Request, principal: CurrentPrincipal, how: HowToAnswer
) -> Response | ImagesResponse:
    claim = how.claims(body.model_dump(mode="json"))
    params = validate_generation(body, get_registry())
    webhook = await webhook_for(body)
    return await answer(request, principal, params, webhook, claim, how)


async def answer(
    request: Request,
    principal: Principal,
    params: GenerationParams,
    webhook: Webhook | None,
    claim: Claim | None,
    how: Answering,
    *,
    job_id: str | None = None,
    prefix: str = "image_generation",
    input_bytes: int | None = None,
) -> Response | ImagesResponse:
    """Record the validated request's job and answer: streamed events, the images
    once it finished, or 202 with the job (generations, edits and variations)."""
    submission = Submission(
        principal,
        params,
        get_registry().get(params.model),
        job_id=job_id or new_id("job"),
        webhook=webhook,
        idempotency=claim,
        cancel_after=how.cancel_after,
        image_life=request_image_life(how.image_expires_after, principal.image_retention_seconds),
        input_bytes=input_bytes,
    )
    respond_async, wait = parse_prefer(how.prefer, how.settings.sync_wait_seconds)
    if params.stream:
        await run_in_threadpool(check_budget, submission)
        return stream_response(
            request,
            submission,
            wait=wait,
            links=how.links,
            prefix=prefix,
        )
    outcome = await submit(request, submission, 0 if respond_async else wait)
    job = outcome.job
    # Asked for 202: the job, even one an idempotent retry finds already finished.
    if outcome.finished and not respond_async:
        if job.status == JobStatus.succeeded:
            if job.cost_usd is not None:  # what the images cost, by the model's price
                how.response.headers[COST_HEADER] = f"{job.cost_usd:.6f}"
            return await outcome.result(
                how.links.storage,
                how.links.base_url,
                how.links.expiry,
                submission.principal.image_retention_seconds,
            )
        raise job_failure(job)
    obj = render_job(job, None, how.links.storage, how.links.base_url, how.links.expiry)
    obj.queue_position = await run_in_threadpool(position, job)
    return accepted(obj)
