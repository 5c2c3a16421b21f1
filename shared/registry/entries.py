"""A registry entry: one public model name, what it can do, and what serves it.

``ModelSpec`` is a discriminated union on ``provider``: ``ProceduralModel``,
``UpstreamModel`` (a remote upstream of one of ``REMOTE_KINDS``) and
``DiffusersModel`` (a local pipeline), over ``ModelBase``'s common fields. Each
kind takes its own fields and refuses every other (``extra="forbid"``): a
diffusers-only field on an openai entry is pydantic's refusal, which the loader
(``shared/registry/__init__.py``) words naming the entry, the field and the
provider.

``Upstream`` groups the fields of one connection (base_url, api_key_env,
upstream_model, upstream_response_format, upstream_streams), written flat on an
openai entry; issue 26's deployments are Upstreams with an id, a weight and limits
(``UpstreamModel.deployments: list[Deployment]``), and an entry without any is the one
deployment its own Upstream fields make, so a models file written today still loads.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_STEPS = 500
# A LoRA's scale: past +-2 adapters trained at 1 only break the image.
MAX_LORA_SCALE = 2.0
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A LoRA adapter's name: what a request's `lora` names it by, and diffusers'
# adapter_name (peft refuses dots in it: they are module paths there).
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Upstream model names of OpenAI's GPT image family (answer_shape's default).
GPT_IMAGE_PREFIXES = ("gpt-image", "chatgpt-image")

# Which of OpenAI's answers a model's take (shared/jobs/openai_shape.py).
AnswerShape = Literal["dall-e", "gpt-image"]


def parse_size(size: str) -> tuple[int, int] | None:
    width, sep, height = size.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return int(width), int(height)


class SizeRule(BaseModel):
    """Free-form ``WIDTHxHEIGHT`` sizes a model accepts beyond its listed ones."""

    model_config = ConfigDict(extra="forbid")

    multiple_of: int = Field(default=16, ge=1)
    max_side: int = Field(default=3840, ge=1)
    max_pixels: int = Field(default=3840 * 2160, ge=1)
    # Longest side over shortest: 3 allows 1:3 to 3:1.
    max_aspect_ratio: float = Field(default=3.0, ge=1)

    def problem(self, width: int, height: int) -> str | None:
        """Why ``width`` x ``height`` is refused, or None."""
        if width % self.multiple_of or height % self.multiple_of:
            return f"both sides must be multiples of {self.multiple_of}"
        if max(width, height) > self.max_side:
            return f"the longer side must be at most {self.max_side}"
        if width * height > self.max_pixels:
            return f"at most {self.max_pixels} pixels"
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            ratio = f"{self.max_aspect_ratio:g}"
            return f"the aspect ratio must be between 1:{ratio} and {ratio}:1"
        return None


class Capabilities(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sizes: list[str]
    # Any WIDTHxHEIGHT within these bounds too (gpt-image-2).
    custom_sizes: SizeRule | None = None
    default_size: str | None = None
    max_n: int = 1
    # Most images one upstream call may return; above it the worker fans out.
    upstream_max_n: int | None = None
    qualities: list[str] = Field(default_factory=list)
    default_quality: str | None = None
    styles: list[str] = Field(default_factory=list)
    default_style: str | None = None
    output_formats: list[str] = Field(default_factory=lambda: list(OUTPUT_FORMATS))
    backgrounds: list[str] = Field(default_factory=list)
    moderations: list[str] = Field(default_factory=list)
    output_compression: bool = False
    max_prompt_chars: int = 4000
    # Takes the ``seed`` extension field (local models: reproducible images).
    seed: bool = False
    # Serves /v1/images/edits and /v1/images/variations.
    edits: bool = False
    variations: bool = False

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            if size != "auto" and parse_size(size) is None:
                raise ValueError(f"bad size {size!r}")
        return sizes


class TokenPrice(BaseModel):
    """USD per token of the upstream's reported usage."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class Price(BaseModel):
    """What a model's images cost, in USD: ``per_image``; or ``per_image_by`` size
    and quality (``"1024x1024/low"``, or a size alone); or ``per_token`` of the
    upstream's usage."""

    model_config = ConfigDict(extra="forbid")

    per_image: float | None = Field(default=None, ge=0)
    per_image_by: dict[str, float] = Field(default_factory=dict)
    per_token: TokenPrice | None = None

    def cost(self, size: str, quality: str | None, images: int, usage: Any) -> float | None:
        """The cost of ``images`` images (or of ``usage``, token-priced); None where
        no price applies."""
        if self.per_token is not None and isinstance(usage, dict):
            tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
            if isinstance(tokens_in, int) and isinstance(tokens_out, int):
                return tokens_in * self.per_token.input + tokens_out * self.per_token.output
        each = self.per_image_by.get(f"{size}/{quality}") if quality else None
        if each is None:
            each = self.per_image_by.get(size, self.per_image)
        return None if each is None else each * images


class ModelBase(BaseModel):
    """The fields of every entry, whatever serves it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    queue: str = "default"
    owned_by: str = "imagegen"
    capabilities: Capabilities
    # Which of OpenAI's answers the model's take (shared/jobs/openai_shape.py):
    # "gpt-image" adds the top-level size, quality, background, output_format and
    # usage that OpenAI's GPT image models answer with; "dall-e" answers created and
    # data only. Unset: "gpt-image" for an OpenAI-compatible upstream serving a GPT
    # image model (upstream_model gpt-image-* or chatgpt-image-*), else "dall-e".
    answer_shape: AnswerShape = "dall-e"
    price: Price | None = None
    # Models tried in order once every deployment of this one has failed an
    # attempt (a fallback that cannot take the request is skipped).
    fallbacks: list[str] = Field(default_factory=list)

    @property
    def default_size(self) -> str:
        return self.capabilities.default_size or self.capabilities.sizes[0]

    # Images one upstream call makes; above it the worker fans out in parallel calls.
    @property
    def images_per_call(self) -> int:
        return self.capabilities.upstream_max_n or self.capabilities.max_n


class ProceduralModel(ModelBase):
    """``provider: procedural``: the built-in picture maker (no keys, no network)."""

    provider: Literal["procedural"] = "procedural"


# The kinds of remote upstream a model (or one of its deployments) may be served by,
# each speaking its provider's own protocol (shared/providers/: issue 27).
RemoteKind: TypeAlias = Literal[
    "openai", "azure_openai", "google", "bedrock", "stability", "replicate", "fal", "comfyui"
]
REMOTE_KINDS: tuple[str, ...] = RemoteKind.__args__  # type: ignore[attr-defined]
# Providers that are queues themselves: the worker submits, records the upstream's
# job and comes back for it, holding no slot meanwhile (worker/upstream_jobs.py).
QUEUE_KINDS = ("replicate", "fal", "comfyui")
# Fields only some kinds take: each other kind refuses them (naming the kinds).
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "api_version": ("azure_openai",),
    "region": ("bedrock",),
    "workflow": ("comfyui",),
    "workflow_inputs": ("comfyui",),
    "file_inputs": ("replicate", "fal"),
    "upstream_streams": ("openai", "azure_openai"),
    # Bedrock signs with the AWS credential chain: a key variable would be ignored.
    "api_key_env": tuple(k for k in REMOTE_KINDS if k != "bedrock"),
}


class FileInputs(BaseModel):
    """replicate, fal: which of the model's inputs takes each file of an edit (and a
    variation's image): ``image`` one input image, or ``images`` a list of them; and
    ``mask``, where the model takes one (sent white where to edit)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = None
    images: str | None = None
    mask: str | None = None

    @model_validator(mode="after")
    def _checked(self) -> FileInputs:
        if (self.image is None) == (self.images is None):
            raise ValueError("give image (an input of one file) or images (of a list), one of them")
        for what in ("image", "images", "mask"):
            value = getattr(self, what)
            if value is not None and not IDENTIFIER.match(value):
                raise ValueError(f"{what}: {value!r} is not an input name")
        return self


class Upstream(BaseModel):
    """One connection to a remote upstream (issue 26: one deployment), of the kind
    ``provider`` names (issue 27)."""

    model_config = ConfigDict(extra="forbid")

    provider: RemoteKind = "openai"
    # The provider's own host (tests point it at fakes); each kind has a default
    # public host where it has one (azure_openai and comfyui have none).
    base_url: str | None = None
    api_key_env: str | None = None
    # The model as the provider names it: an OpenAI model, an Azure deployment, a
    # Gemini or Imagen model, a Bedrock model id, Stability's endpoint (core, ultra,
    # sd3), Replicate's owner/name[:version], fal's app id.
    upstream_model: str | None = None
    # Which response_format to ask the upstream for; None sends none (gpt-image
    # models refuse the field and always answer b64_json).
    upstream_response_format: Literal["url", "b64_json"] | None = "b64_json"
    # The upstream streams partial images itself (OpenAI's GPT image models): a
    # streamed request with partial_images is forwarded with stream: true.
    upstream_streams: bool = False
    # azure_openai: the api-version query parameter.
    api_version: str | None = None
    # bedrock: the AWS region (credentials come from the AWS chain).
    region: str | None = None
    # comfyui: a workflow in ComfyUI's API format (a JSON file), and which node
    # input takes each of the request's fields ({"prompt": "6.text", "seed":
    # "3.seed", "width": "5.width", "height": "5.height", "steps": "3.steps",
    # "n": "5.batch_size"}; an edit's "image": "10.image" on a LoadImage node and
    # "mask": "11.image" on a LoadImageMask, its files uploaded to the server).
    workflow: str | None = None
    workflow_inputs: dict[str, str] = Field(default_factory=dict)
    # replicate, fal: the model's inputs for an edit's files (unset: FLUX Kontext's,
    # replicate {"image": "input_image"}, fal {"image": "image_url"}).
    file_inputs: FileInputs | None = None
    # Queue-style kinds: seconds between looks at a pending upstream job.
    poll_seconds: float = Field(default=2.0, gt=0, le=300)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @model_validator(mode="after")
    def _kind_fields(self) -> Upstream:
        for name, kinds in KIND_FIELDS.items():
            if name in self.model_fields_set and self.provider not in kinds:
                raise ValueError(f"{name}: only a {' or '.join(kinds)} upstream takes it")
        needs = {
            "azure_openai": ("base_url", "api_version"),
            "bedrock": ("region",),
            "comfyui": ("base_url", "workflow"),
        }
        # An entry of deployments connects through them: each is checked itself.
        own = () if getattr(self, "deployments", None) else needs.get(self.provider, ())
        for name in own:
            if not getattr(self, name):
                raise ValueError(f"{name}: a {self.provider} upstream needs one")
        return self


class Deployment(Upstream):
    """One upstream serving a model: its connection, its share of the traffic
    (``weight``) and its limits."""

    id: str = Field(min_length=1, max_length=100)
    weight: float = Field(default=1.0, gt=0)
    images_per_minute: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)


class UpstreamModel(Upstream, ModelBase):
    """A remote upstream of any kind (``provider``: openai, any OpenAI-compatible
    ``/images/*`` upstream, or another provider's protocol), or several
    (``deployments``, each of its own kind)."""

    deployments: list[Deployment] = Field(default_factory=list)

    def upstreams(self) -> list[Deployment]:
        """Its deployments; without any, the one its own upstream fields make (its
        id the model's name)."""
        if self.deployments:
            return self.deployments
        fields = (self.model_fields_set & Upstream.model_fields.keys()) | {"provider"}
        return [Deployment(id=self.name, **{name: getattr(self, name) for name in fields})]

    def served_by(self, deployment: Deployment) -> UpstreamModel:
        """This entry as ``deployment`` serves it: its connection fields swapped in."""
        return self.model_copy(
            update={name: getattr(deployment, name) for name in Upstream.model_fields}
        )

    @model_validator(mode="before")
    @classmethod
    def _answer_shape_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "answer_shape" not in data:
            upstream = str(data.get("upstream_model") or data.get("name") or "")
            if upstream.startswith(GPT_IMAGE_PREFIXES):
                data = {**data, "answer_shape": "gpt-image"}
        return data


class DiffusersModel(ModelBase):
    """``provider: diffusers``: a local pipeline, run by a GPU worker."""

    provider: Literal["diffusers"] = "diffusers"
    # Local models run on their own queue unless the entry names one: a GPU worker
    # serves them one call at a time, apart from the provider calls.
    queue: str = "gpu"
    # A folder written by save_pretrained, or a Hugging Face Hub id (resolved from
    # the local cache; downloaded on first use unless IMAGEGEN_HF_OFFLINE is set).
    model_path: str | None = None
    # A diffusers pipeline class name; "auto" is AutoPipelineForText2Image.
    pipeline: str = "auto"
    # "auto": bfloat16 on a GPU that has it (else float16), float32 on the CPU.
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # "auto": the worker's --device, else the first GPU, else the CPU.
    device: str = "auto"
    # At most 500: schedulers count 1,000 training timesteps, and some (DDIM) index
    # past them at 1,000 inference steps; no model needs more than a few hundred.
    steps: int = Field(default=25, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0, le=100)
    # quality -> denoising steps (e.g. low: 12, medium: 25, high: 50); its keys are
    # the model's qualities unless the capabilities name them.
    quality_steps: dict[str, int] = Field(default_factory=dict)
    # A diffusers scheduler class to swap in (e.g. EulerDiscreteScheduler).
    scheduler: str | None = None
    # Memory options: move each component to the GPU only while it runs (slower,
    # about a third of the memory); decode the image in tiles (large sizes).
    cpu_offload: bool = False
    vae_tiling: bool = False
    # Batching across requests (issue 30): the most images one pipeline call makes,
    # from as many jobs as share its settings (sized by the device's memory: an
    # out-of-memory error splits the call); 1 turns batching off. How long a call
    # waits for companions, when the device is busy or was just freed (never when
    # idle: a lone request starts at once).
    max_batch_images: int = Field(default=4, ge=1, le=64)
    batch_wait_ms: int = Field(default=20, ge=0, le=2000)
    # Load at worker start and keep warm: evicted only when no other model can
    # make room (pipelines are unloaded least recently used past the device's
    # memory budget, shared/providers/local/pipelines.py).
    preload: bool = True
    # The LoRA adapters a request may name in its `lora` field, by name.
    adapters: dict[str, Adapter] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _capability_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("capabilities"), dict):
            caps = {"seed": True, "edits": True, **data["capabilities"]}
            if "qualities" not in caps and isinstance(data.get("quality_steps"), dict):
                caps["qualities"] = list(data["quality_steps"])
            data = {**data, "capabilities": caps}
        return data

    @model_validator(mode="after")
    def _checked(self) -> DiffusersModel:
        if not self.model_path:
            raise ValueError("model_path: a local model needs one (a folder or a Hub id)")
        if not DEVICE.match(self.device):
            raise ValueError(f"device: {self.device!r} is not auto, cpu, mps, cuda or cuda:N")
        for value, what in ((self.pipeline, "pipeline"), (self.scheduler, "scheduler")):
            if value is not None and not IDENTIFIER.match(value):
                raise ValueError(f"{what}: {value!r} is not a diffusers class name")
        bad = [size for size in self.capabilities.sizes if not _multiple_of_8(size)]
        if bad:
            raise ValueError(f"capabilities.sizes: {bad[0]!r} is not WIDTHxHEIGHT, multiples of 8")
        for quality, steps in self.quality_steps.items():
            if quality not in self.capabilities.qualities:
                raise ValueError(f"quality_steps: {quality!r} is not among capabilities.qualities")
            if not 1 <= steps <= MAX_STEPS:
                raise ValueError(f"quality_steps: {quality}: {steps} steps, not 1 to {MAX_STEPS}")
        for name in self.adapters:
            if not ADAPTER_NAME.match(name):
                raise ValueError(
                    f"adapters: {name!r} is not a name (letters, digits, _ and -, at most 64)"
                )
        return self

    def steps_for(self, quality: str | None) -> int:
        return self.quality_steps.get(quality or "", self.steps)


class Adapter(BaseModel):
    """A LoRA adapter a local model may use (issue 30), named by a request's ``lora``."""

    model_config = ConfigDict(extra="forbid")

    # A .safetensors file, a folder holding one (save_lora_weights' output), or a
    # Hugging Face Hub id: read by the GPU worker when a request first names it.
    path: str = Field(min_length=1)
    # The scale a request gets when it names the adapter without one.
    default_scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)


def _multiple_of_8(size: str) -> bool:
    wh = parse_size(size)
    return wh is not None and wh[0] % 8 == 0 and wh[1] % 8 == 0


# A registry entry, one of the kinds by its ``provider``.
ModelSpec: TypeAlias = Annotated[
    ProceduralModel | UpstreamModel | DiffusersModel, Field(discriminator="provider")
]
# Each kind by its ``provider`` (the union's tags).
KINDS: dict[str, type[ModelBase]] = {
    "procedural": ProceduralModel,
    **dict.fromkeys(REMOTE_KINDS, UpstreamModel),
    "diffusers": DiffusersModel,
}
_SPEC: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)


def model_spec(data: Any) -> ModelSpec:
    """One entry from its models-file mapping (the kind its ``provider`` names)."""
    return _SPEC.validate_python(data)
