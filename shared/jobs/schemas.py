"""Wire shapes of the OpenAI surface, and the normalized generation parameters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from shared.core.schemas import ListPage
from shared.jobs.models import Job, JobStatus

MAX_SEED = 2**32 - 1


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``. ``null`` means "use the default" everywhere.

    Unknown fields are ignored rather than refused: gateways and SDKs add their own.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr = Field(min_length=1)
    model: StrictStr | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=10)
    size: StrictStr | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: StrictInt | None = Field(default=None, ge=0, le=100)
    background: StrictStr | None = None
    moderation: StrictStr | None = None
    # OpenAI sets no documented limit; end-user ids are short, and a bound keeps the
    # trace and the upstream call sane.
    user: StrictStr | None = Field(default=None, max_length=256)
    # Extensions (the openai package sends them with extra_body): a per-job webhook.
    webhook_url: StrictStr | None = Field(default=None, max_length=2000)
    webhook_events: list[StrictStr] | None = Field(default=None, max_length=20)
    # Extension, models with the seed capability (local models): image i of the job
    # uses seed + i; the same request and seed give the same images on the same
    # device and dtype. Without one a random seed is chosen and recorded.
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    # OpenAI's streaming: text/event-stream of partial images, then the completed ones.
    stream: StrictBool | None = None
    partial_images: StrictInt | None = Field(default=None, ge=0, le=3)


class GenerationParams(BaseModel):
    """A validated request with every default filled in; stored on the job."""

    model: str
    prompt: str
    n: int
    size: str
    quality: str | None = None
    style: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    seed: int | None = None
    stream: bool = False
    partial_images: int = 0
    # Edits and variations: the input images and mask, stored under the job (keys).
    operation: Literal["generate", "edit", "variation"] = "generate"
    images: list[str] = Field(default_factory=list)
    mask: str | None = None
    input_fidelity: Literal["high", "low"] | None = None


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: str | None = None
    output_format: str | None = None
    quality: str | None = None
    size: str | None = None
    usage: dict[str, Any] | None = None


class JobError(BaseModel):
    code: str
    message: str


class JobProgress(BaseModel):
    """Denoising steps done of the steps the job's model runs (local models)."""

    step: int
    steps: int


class JobObject(BaseModel):
    id: str
    object: Literal["image.job"] = "image.job"
    status: JobStatus
    model: str
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    canceled_at: int | None = None
    attempts: int
    request: dict[str, Any]
    result: ImagesResponse | None = None
    error: JobError | None = None
    # The trace call recording this job (POST /call/read), when tracked.
    call_id: str | None = None
    # While queued: about how many jobs of the same queue run before this one
    # (1 = next). Approximate: FIFO order by creation, all projects.
    queue_position: int | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    # While running: what it waits on, if anything ("waiting for storage: ...").
    status_detail: str | None = None
    # The X-Request-Id of the request that created the job.
    request_id: str | None = None
    progress: JobProgress | None = None
    # The seed of each image, in order (models with the seed capability).
    seeds: list[int] | None = None


JobList = ListPage[JobObject]


def job_params(job: Job) -> GenerationParams:
    return GenerationParams.model_validate(job.request)
