"""Wire shapes of the OpenAI surface, and the normalized generation parameters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from shared.core.schemas import ListPage, Schema
from shared.jobs.models import Job, JobStatus
from shared.registry import MAX_LORA_SCALE

MAX_SEED = 2**32 - 1
# Most LoRA adapters one request names (issue 30): each adds its own products to
# every projection it adapts, on every step; past a few, they only muddy each other.
MAX_LORAS = 4


class LoraRequest(Schema):
    """One LoRA adapter a request names."""

    # A misspelt key ("weight") would silently take the default scale: refused.
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(min_length=1, max_length=64)
    """One of the model's adapters (its registry entry's ``adapters``)."""
    scale: StrictFloat | None = Field(
        default=None, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False
    )
    """How strongly it applies, -2 to 2 (0: not at all); the adapter's
    ``default_scale`` when null."""


class ImageGenerationRequest(Schema):
    """``POST /v1/images/generations``. ``null`` means "use the default" everywhere.

    Unknown fields are ignored rather than refused: gateways and SDKs add their own.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr = Field(min_length=1)
    """What to draw. The model's own limit on its length applies."""
    model: StrictStr | None = None
    """A model from ``GET /v1/models``; the registry's default when null."""
    n: StrictInt | None = Field(default=None, ge=1, le=10)
    """How many images, 1 to 10 (the model may allow fewer); 1 when null."""
    size: StrictStr | None = None
    """``WIDTHxHEIGHT`` from the model's sizes, or ``auto``; the model's default when
    null."""
    quality: StrictStr | None = None
    """The model's quality levels (``low``, ``medium``, ``high``, ``auto``, ``hd``,
    ``standard``); local models map them to step counts."""
    style: StrictStr | None = None
    """``vivid`` or ``natural`` (dall-e-3 only)."""
    response_format: Literal["url", "b64_json"] | None = None
    """``url`` (a presigned URL to our storage) or ``b64_json`` (the bytes inline)."""
    output_format: Literal["png", "jpeg", "webp"] | None = None
    """The image file format; ``png`` when null."""
    output_compression: StrictInt | None = Field(default=None, ge=0, le=100)
    """0 to 100, for ``jpeg`` and ``webp``."""
    background: StrictStr | None = None
    """``transparent``, ``opaque`` or ``auto``, where the model supports it."""
    moderation: StrictStr | None = None
    """``low`` or ``auto``, passed to providers that moderate."""
    # OpenAI sets no documented limit; end-user ids are short, and a bound keeps the
    # trace and the upstream call sane.
    user: StrictStr | None = Field(default=None, max_length=256)
    """Your end user's id, recorded on the job and its trace, passed upstream."""
    webhook_url: StrictStr | None = Field(default=None, max_length=2000)
    """Extension: a URL that receives this job's events, signed with the project's
    default secret (Standard Webhooks). Send it with ``extra_body``."""
    webhook_events: list[StrictStr] | None = Field(default=None, max_length=20)
    """Extension: which of ``job.started``, ``job.succeeded``, ``job.failed`` and
    ``job.canceled`` ``webhook_url`` receives; all of them when null."""
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    """Extension, models with the seed capability (local models): image i of the job
    uses ``seed + i``; the same request and seed give the same images on the same
    device and dtype. Without one a random seed is chosen and recorded."""
    lora: list[LoraRequest] | None = Field(default=None, max_length=MAX_LORAS)
    """Extension, local models with adapters: the LoRA adapters to apply, at most 4,
    each ``{"name": ..., "scale": ...}``; none when null. The images differ from the
    plain model's only by them: a request without any gets the model's own."""
    stream: StrictBool | None = None
    """Answer ``text/event-stream`` in OpenAI's image events: partial images, then
    ``image_generation.completed``."""
    partial_images: StrictInt | None = Field(default=None, ge=0, le=3)
    """How many partial images a stream sends before the completed one, 0 to 3."""


class ImageEditForm(ImageGenerationRequest):
    """``POST /v1/images/edits``, multipart/form-data: the generation's fields (as
    text), the images and an optional mask. Documents the form; the route reads it
    part by part (``api/routes/edits.py``)."""

    image: list[bytes]
    """The image(s) to edit: ``image``, or ``image[]`` up to 16 times; png, webp or
    jpeg, each at most ``IMAGEGEN_EDIT_MAX_IMAGE_BYTES``."""
    mask: bytes | None = None
    """A png of the first image's size whose transparent pixels mark where to edit."""
    input_fidelity: Literal["high", "low"] | None = None
    """How closely to keep the input's features (``high`` changes less)."""
    lora: StrictStr | None = None  # type: ignore[assignment]
    """Extension: the generation's ``lora`` as JSON text, e.g.
    ``[{"name": "ink", "scale": 0.8}]``."""


class ImageVariationForm(Schema):
    """``POST /v1/images/variations``, multipart/form-data (dall-e-2 style)."""

    image: bytes
    """The image: png, webp or jpeg."""
    model: str | None = None
    """A model with the variations capability; the first such when null."""
    n: int | None = Field(default=None, ge=1, le=10)
    """How many images; 1 when null."""
    size: str | None = None
    """``WIDTHxHEIGHT`` from the model's sizes."""
    response_format: Literal["url", "b64_json"] | None = None
    """``url`` or ``b64_json``."""
    user: str | None = None
    """Your end user's id."""
    webhook_url: str | None = None
    """Extension: a per-job webhook."""


class LoraChoice(BaseModel):
    """One LoRA adapter a job uses (issue 30), its scale filled in: stored on the job."""

    name: str
    scale: float


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
    # Local models: the LoRA adapters applied, in the request's order.
    lora: list[LoraChoice] = Field(default_factory=list)


class ImageData(Schema):
    """One generated image."""

    url: str | None = None
    """A presigned URL to the image in storage (``response_format: url``); it expires
    after the configured time, and reading the job again gives a fresh one."""
    b64_json: str | None = None
    """The image file, base64 (``response_format: b64_json``)."""
    revised_prompt: str | None = None
    """The prompt the model used, where it rewrites prompts (dall-e-3)."""
    expired: bool | None = None
    """``true`` in place of ``url``/``b64_json`` once the image is past its life (its
    project's image retention or the request's ``Image-Expires-After``) and deleted."""


class ImagesResponse(Schema):
    """OpenAI's answer to an image request."""

    created: int
    """When the job was created, Unix seconds."""
    data: list[ImageData]
    """The images, exactly ``n``, in order."""
    background: str | None = None
    """The background used, where the request set one."""
    output_format: str | None = None
    """The image file format."""
    quality: str | None = None
    """The quality used, where the request set one."""
    size: str | None = None
    """The images' size, ``WIDTHxHEIGHT``."""
    usage: dict[str, Any] | None = None
    """The provider's own usage figures (tokens, with ``input_tokens_details`` and
    ``output_tokens_details``), where it reports them."""


class JobError(Schema):
    """Why a job failed."""

    code: str
    """A stable code: ``content_policy_violation``, ``upstream_error``,
    ``upstream_timeout``, ``out_of_memory``, ``model_unavailable``, ..."""
    message: str
    """What happened, for a person."""


class JobProgress(Schema):
    """Denoising steps done of the steps the job's model runs (local models)."""

    step: int
    """Steps done."""
    steps: int
    """Steps in all."""


class ServedBy(Schema):
    """What made a job's images."""

    model: str
    """The registry's model (the job's own, or the fallback that served it)."""
    deployment: str
    """The deployment's ``id`` (the model's name where it has no deployments)."""


class JobObject(Schema):
    """An image job: the request, its state and, once finished, its result."""

    id: str
    """The job's id (``job_...``)."""
    object: Literal["image.job"] = "image.job"
    """Always ``image.job``."""
    status: JobStatus
    """``queued``, ``running``, then ``succeeded``, ``failed`` or ``canceled``."""
    model: str
    """The model the job runs on."""
    created_at: int
    """When it was accepted, Unix seconds."""
    started_at: int | None = None
    """When a worker first claimed it, Unix seconds."""
    finished_at: int | None = None
    """When it ended, Unix seconds."""
    canceled_at: int | None = None
    """When it was canceled, Unix seconds."""
    attempts: int
    """How many times a worker has claimed it (a retry after a crash counts)."""
    request: dict[str, Any]
    """The validated request, every default filled in."""
    result: ImagesResponse | None = None
    """The answer a synchronous request would have had, once succeeded; URLs fresh."""
    error: JobError | None = None
    """Why it failed, once failed."""
    call_id: str | None = None
    """The trace call recording this job (``POST /call/read``), when tracked."""
    queue_position: int | None = None
    """While queued: about how many jobs of the same queue run before this one
    (1 = next). Approximate: FIFO order by creation, all projects."""
    webhook_url: str | None = None
    """The per-job webhook URL, when the request set one."""
    webhook_events: list[str] | None = None
    """The events the per-job webhook receives."""
    status_detail: str | None = None
    """What it waits on, if anything: while running, ``waiting for storage: ...``;
    while queued again, ``waiting for capacity: ...`` (every deployment of its
    model at its limit)."""
    request_id: str | None = None
    """The ``X-Request-Id`` of the request that created the job."""
    progress: JobProgress | None = None
    """While running on a local model: denoising steps done."""
    seeds: list[int] | None = None
    """The seed of each image, in order (models with the seed capability)."""
    served_by: ServedBy | None = None
    """Once succeeded: the model and the deployment that made the images (a
    fallback model's name where one served)."""
    cost_usd: float | None = None
    """Once succeeded: what the images cost in USD, by the serving model's
    ``price``; absent where it has none."""


JobList = ListPage[JobObject]


def job_params(job: Job) -> GenerationParams:
    return GenerationParams.model_validate(job.request)
