"""``POST /v1/images/generations``: validate, record, enqueue, then wait or answer 202."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api import openapi
from api.deps import BaseUrl, CurrentPrincipal, IdempotencyKeyHeader, SettingsDep, StorageDep
from api.generation import position, submit, webhook_for
from api.streaming import stream_response
from shared.core.ids import new_id
from shared.core.settings import Settings
from shared.core.storage import Storage
from shared.idempotency.service import Claim, claim_of
from shared.jobs.input import validate_generation
from shared.jobs.models import JobStatus
from shared.jobs.schemas import (
    GenerationParams,
    ImageGenerationRequest,
    ImagesResponse,
    JobObject,
)
from shared.jobs.submission import Submission
from shared.jobs.views import job_failure, render_job
from shared.projects.service import Principal
from shared.registry import get_registry
from shared.webhooks.service import Webhook

router = APIRouter(tags=["images"])

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
)
async def create_image(
    body: ImageGenerationRequest,
    request: Request,
    principal: CurrentPrincipal,
    settings: SettingsDep,
    storage: StorageDep,
    base_url: BaseUrl,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response | ImagesResponse:
    registry = get_registry()
    claim = claim_of(idempotency_key, "POST", request.url.path, body.model_dump(mode="json"))
    params = validate_generation(body, registry)
    webhook = await webhook_for(body)
    return await answer(
        request, principal, params, webhook, claim, prefer, settings, storage, base_url
    )


async def answer(
    request: Request,
    principal: Principal,
    params: GenerationParams,
    webhook: Webhook | None,
    claim: Claim | None,
    prefer: str | None,
    settings: Settings,
    storage: Storage,
    base_url: str,
    *,
    job_id: str | None = None,
    prefix: str = "image_generation",
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
    )
    respond_async, wait = parse_prefer(prefer, settings.sync_wait_seconds)
    if params.stream:
        return stream_response(
            request,
            submission,
            wait=wait,
            storage=storage,
            base_url=base_url,
            url_expiry=settings.url_expiry_seconds,
            prefix=prefix,
        )
    outcome = await submit(request, submission, 0 if respond_async else wait)
    job = outcome.job
    # Asked for 202: the job, even one an idempotent retry finds already finished.
    if outcome.finished and not respond_async:
        if job.status == JobStatus.succeeded:
            return await outcome.result(storage, base_url, settings.url_expiry_seconds)
        raise job_failure(job)
    obj = render_job(job, None, storage, base_url, settings.url_expiry_seconds)
    obj.queue_position = await run_in_threadpool(position, job)
    return accepted(obj)
