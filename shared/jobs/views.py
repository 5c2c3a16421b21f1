from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Protocol

from shared.core.clock import to_unix, utcnow
from shared.core.errors import (
    ClientError,
    Conflict,
    ErrorCode,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    UpstreamError,
)
from shared.core.storage import Storage
from shared.jobs.models import Image, Job, JobStatus
from shared.jobs.openai_shape import AnswerShape, response_fields
from shared.jobs.schemas import (
    ImageData,
    ImagesResponse,
    JobError,
    JobList,
    JobObject,
    JobProgress,
    ServedBy,
    job_params,
)
from shared.registry import get_registry
from shared.retention.policy import image_ends_at, url_life

_DETAILED = (JobStatus.running, JobStatus.queued)


def job_failure(job: Job) -> ClientError:
    """How a failed (or canceled) job answers a waiting request, and its batch line."""
    code = job.error_code or ErrorCode.job_failed
    message = job.error_message or "The job failed."
    if job.status == JobStatus.canceled and code == ErrorCode.deadline_exceeded:
        return Conflict(message, code=code)  # its Cancel-After passed first
    if job.status == JobStatus.canceled:
        return Conflict("The job was canceled before it finished.", code=ErrorCode.job_canceled)
    if code == ErrorCode.upstream_timeout:
        return UpstreamError(message, code=code, status=504)
    if code == ErrorCode.upstream_rate_limited:
        return RateLimited(message, code=code, retry_after=30)
    if code == ErrorCode.internal_error:
        return UpstreamError(message, code=code, status=500)
    if code.startswith("upstream_") or code == ErrorCode.provider_misconfigured:
        return UpstreamError(message, code=code)
    if code == ErrorCode.model_unavailable:  # a local model or adapter that cannot load
        return UpstreamError(message, code=code, status=503)
    if code == ErrorCode.out_of_memory:  # too big for the device: a smaller size or n
        return InvalidRequest(message, code=code, param="size")
    # The provider refused the request itself (content policy, invalid prompt):
    # the client's request is at fault, as OpenAI answers it.
    return InvalidRequest(message, code=code, param="prompt")


class StoredImage(Protocol):
    """What an answer needs of an image: a row, or a worker's reply."""

    storage_key: str
    revised_prompt: str | None


def render_result(
    job: Job,
    images: Sequence[StoredImage],
    storage: Storage,
    base_url: str,
    url_expiry: int,
    inline: list[str] | None = None,
    *,
    retention_seconds: int | None = None,
) -> ImagesResponse:
    """The job's answer; ``inline`` is the images' base64 when already at hand
    (otherwise a ``b64_json`` answer reads them back from storage). An image past
    its life (marked by the purge, or past its time already: ``retention_seconds``
    is its project's image retention where the caller knows it) is an ``expired``
    marker; a URL never outlives its image."""
    params = job_params(job)
    data = []
    now = utcnow()
    for i, image in enumerate(images):
        # A worker's reply carries no created_at: its images were made as it finished.
        made = getattr(image, "created_at", None) or job.finished_at or now
        ends = image_ends_at(job.images_expire_at, made, retention_seconds)
        if getattr(image, "expired_at", None) is not None or (ends is not None and ends <= now):
            data.append(ImageData(expired=True, revised_prompt=image.revised_prompt))
        elif params.response_format == "b64_json":
            b64 = inline[i] if inline else base64.b64encode(storage.get(image.storage_key)).decode()
            data.append(ImageData(b64_json=b64, revised_prompt=image.revised_prompt))
        else:
            data.append(
                ImageData(
                    url=storage.url(image.storage_key, url_life(ends, now, url_expiry), base_url),
                    revised_prompt=image.revised_prompt,
                )
            )
    return ImagesResponse(
        created=to_unix(job.finished_at) or to_unix(job.created_at) or 0,
        data=data,
        **response_fields(answer_shape(job.model), params, job.usage),
    )


def answer_shape(model: str) -> AnswerShape:
    """The registry's answer shape for a job's model (dall-e's for a model since
    removed from the registry)."""
    try:
        return get_registry().get(model).answer_shape
    except ModelNotFound:
        return "dall-e"


def render_job(
    job: Job,
    images: list[Image] | None,
    storage: Storage,
    base_url: str,
    url_expiry: int,
    *,
    retention_seconds: int | None = None,
) -> JobObject:
    result = None
    if job.status == JobStatus.succeeded and images is not None:
        result = render_result(
            job, images, storage, base_url, url_expiry, retention_seconds=retention_seconds
        )
    error = None
    # A failure's error, and a cancel's when its deadline ended it (deadline_exceeded).
    deadline = job.status == JobStatus.canceled and job.error_code == ErrorCode.deadline_exceeded
    if job.status == JobStatus.failed or deadline:
        error = JobError(
            code=job.error_code or "job_failed", message=job.error_message or "The job failed."
        )
    return JobObject(
        id=job.id,
        status=JobStatus(job.status),
        model=job.model,
        created_at=to_unix(job.created_at) or 0,
        started_at=to_unix(job.started_at),
        finished_at=to_unix(job.finished_at),
        canceled_at=to_unix(job.canceled_at),
        attempts=job.attempts,
        request=job.request,
        result=result,
        error=error,
        call_id=job.call_id,
        webhook_url=job.webhook_url,
        webhook_events=job.webhook_events,
        request_id=job.request_id,
        # Running: what it waits on; queued again: why (waiting for capacity).
        status_detail=job.status_detail if job.status in _DETAILED else None,
        progress=JobProgress.model_validate(job.progress) if job.progress else None,
        seeds=_seeds(job.request),
        served_by=ServedBy.model_validate(job.served_by) if job.served_by else None,
        cost_usd=job.cost_usd,
    )


def _seeds(request: dict[str, Any]) -> list[int] | None:
    seed, n = request.get("seed"), request.get("n")
    if not isinstance(seed, int) or not isinstance(n, int):
        return None
    return [seed + index for index in range(n)]


def render_list(
    jobs: list[Job], has_more: bool, storage: Storage, base_url: str, url_expiry: int
) -> JobList:
    # Listings carry no result (no presigning or b64 reads for a whole page);
    # fetch one job to get its images.
    data = [render_job(job, None, storage, base_url, url_expiry) for job in jobs]
    return JobList.of(data, has_more)
