"""The model registry: which public model names exist and what each can do.

Loaded from the YAML file at ``IMAGEGEN_MODELS_FILE``; without one, the built-in
``procedural`` model plus OpenAI's three image models when ``OPENAI_API_KEY`` is set.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.core.errors import ModelNotFound, quoted
from shared.core.schemas import Schema
from shared.core.settings import get_settings

OUTPUT_FORMATS = ("png", "jpeg", "webp")


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


# The fields only a local (diffusers) model takes; on any other entry they are refused.
LOCAL_FIELDS = (
    "model_path",
    "pipeline",
    "dtype",
    "device",
    "steps",
    "guidance_scale",
    "quality_steps",
    "scheduler",
    "cpu_offload",
    "vae_tiling",
)
MAX_STEPS = 500
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# Upstream model names of OpenAI's GPT image family (answer_shape's default).
GPT_IMAGE_PREFIXES = ("gpt-image", "chatgpt-image")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    provider: Literal["procedural", "openai", "diffusers"]
    upstream_model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    queue: str = "default"
    # Which response_format to ask the upstream for; None sends none (gpt-image
    # models refuse the field and always answer b64_json).
    upstream_response_format: Literal["url", "b64_json"] | None = "b64_json"
    owned_by: str = "imagegen"
    capabilities: Capabilities
    # The upstream streams partial images itself (OpenAI's GPT image models): a
    # streamed request with partial_images is forwarded with stream: true.
    upstream_streams: bool = False
    # Which of OpenAI's answers the model's take (shared/jobs/openai_shape.py):
    # "gpt-image" adds the top-level size, quality, background, output_format and
    # usage that OpenAI's GPT image models answer with; "dall-e" answers created and
    # data only. Unset: "gpt-image" for an OpenAI-compatible upstream serving a GPT
    # image model (upstream_model gpt-image-* or chatgpt-image-*), else "dall-e".
    answer_shape: Literal["dall-e", "gpt-image"] = "dall-e"

    # Local models (provider: diffusers). model_path: a folder written by
    # save_pretrained, or a Hugging Face Hub id (resolved from the local cache;
    # downloaded on first use unless IMAGEGEN_HF_OFFLINE is set).
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

    @model_validator(mode="before")
    @classmethod
    def _answer_shape_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "answer_shape" not in data:
            upstream = str(data.get("upstream_model") or data.get("name") or "")
            if data.get("provider") == "openai" and upstream.startswith(GPT_IMAGE_PREFIXES):
                data = {**data, "answer_shape": "gpt-image"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _local_defaults(cls, data: Any) -> Any:
        # Local models run on their own queue unless the entry names one: a GPU
        # worker serves them one call at a time, apart from the provider calls.
        if isinstance(data, dict) and data.get("provider") == "diffusers":
            data = {"queue": "gpu", **data}
            caps = data.get("capabilities")
            if isinstance(caps, dict):
                caps = {"seed": True, "edits": True, **caps}
                if "qualities" not in caps and isinstance(data.get("quality_steps"), dict):
                    caps["qualities"] = list(data["quality_steps"])
                data["capabilities"] = caps
        return data

    @model_validator(mode="after")
    def _local_fields(self) -> ModelSpec:
        if self.provider != "diffusers":
            for name in LOCAL_FIELDS:
                if name in self.model_fields_set:
                    raise ValueError(f"{name}: only a 'diffusers' model takes it")
            return self
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
        return self

    def steps_for(self, quality: str | None) -> int:
        return self.quality_steps.get(quality or "", self.steps)

    @property
    def default_size(self) -> str:
        return self.capabilities.default_size or self.capabilities.sizes[0]

    # Images one upstream call makes; above it the worker fans out in parallel calls.
    @property
    def images_per_call(self) -> int:
        return self.capabilities.upstream_max_n or self.capabilities.max_n

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class RegistryError(ValueError):
    """A models file that cannot be used; the message names the entry and field."""


class Registry(BaseModel):
    models: list[ModelSpec]

    @property
    def local_queues(self) -> set[str]:
        """Queues that local models run on (served by GPU workers)."""
        return {spec.queue for spec in self.models if spec.provider == "diffusers"}

    def get(self, name: str | None) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        known = ", ".join(spec.name for spec in self.models)
        hint = ""
        if not os.environ.get("OPENAI_API_KEY") and str(name).startswith(("dall-e", "gpt-image")):
            hint = " (OpenAI's models are served when OPENAI_API_KEY is set)"
        raise ModelNotFound(
            f"The model '{quoted(name)}' does not exist. Available: {known}{hint}.",
            param="model",
        )

    @property
    def default_model(self) -> str:
        return self.models[0].name


def _multiple_of_8(size: str) -> bool:
    wh = parse_size(size)
    return wh is not None and wh[0] % 8 == 0 and wh[1] % 8 == 0


def parse_size(size: str) -> tuple[int, int] | None:
    width, sep, height = size.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return int(width), int(height)


PROCEDURAL = ModelSpec(
    name="procedural",
    provider="procedural",
    owned_by="imagegen",
    capabilities=Capabilities(
        sizes=[
            "1024x1024",
            "64x64",
            "256x256",
            "512x512",
            "1536x1024",
            "1024x1536",
            "1792x1024",
            "1024x1792",
        ],
        max_n=10,
        qualities=["standard", "hd", "low", "medium", "high", "auto"],
        styles=["vivid", "natural"],
        backgrounds=["auto", "opaque"],
        moderations=["auto", "low"],
        output_compression=True,
        max_prompt_chars=32000,
        edits=True,
        variations=True,
    ),
)


# OpenAI's GPT image models; gpt-image-2 also takes free-form sizes (SizeRule's
# defaults: sides multiples of 16, at most 3840 on a side and 3840x2160 pixels,
# between 1:3 and 3:1).
GPT_IMAGE_MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2")


def openai_models(base_url: str = "https://api.openai.com/v1") -> list[ModelSpec]:
    """OpenAI's image models with the limits OpenAI documents."""
    common: dict[str, Any] = {
        "provider": "openai",
        "base_url": base_url,
        "api_key_env": "OPENAI_API_KEY",
        "owned_by": "openai",
    }
    return [
        ModelSpec(
            name="dall-e-2",
            upstream_model="dall-e-2",
            **common,
            capabilities=Capabilities(
                sizes=["1024x1024", "256x256", "512x512"],
                max_n=10,
                output_formats=list(OUTPUT_FORMATS),
                max_prompt_chars=1000,
                edits=True,
                variations=True,
            ),
        ),
        ModelSpec(
            name="dall-e-3",
            upstream_model="dall-e-3",
            **common,
            capabilities=Capabilities(
                sizes=["1024x1024", "1792x1024", "1024x1792"],
                max_n=1,
                upstream_max_n=1,
                qualities=["standard", "hd"],
                default_quality="standard",
                styles=["vivid", "natural"],
                default_style="vivid",
                max_prompt_chars=4000,
            ),
        ),
        *(
            ModelSpec(
                name=name,
                upstream_model=name,
                upstream_response_format=None,
                upstream_streams=True,
                **common,
                capabilities=Capabilities(
                    sizes=["auto", "1024x1024", "1536x1024", "1024x1536"],
                    custom_sizes=SizeRule() if name == "gpt-image-2" else None,
                    default_size="auto",
                    max_n=10,
                    qualities=["auto", "low", "medium", "high"],
                    default_quality="auto",
                    backgrounds=["auto", "transparent", "opaque"],
                    moderations=["auto", "low"],
                    output_compression=True,
                    max_prompt_chars=32000,
                    edits=True,
                ),
            )
            for name in GPT_IMAGE_MODELS
        ),
    ]


def load_registry(path: Path | None) -> Registry:
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        try:
            return Registry.model_validate(data)
        except ValidationError as exc:
            raise RegistryError(f"{path}: {_describe(exc, data)}") from None
    models = [PROCEDURAL]
    if os.environ.get("OPENAI_API_KEY"):
        models += openai_models(os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    return Registry(models=models)


def _describe(exc: ValidationError, data: Any) -> str:
    """The first problem, named by entry and field: "model 'sd15': steps: ..."."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        entries = data.get("models") if isinstance(data, dict) else None
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"model {name!r}: " if name else f"models[{loc[1]}]: "
        loc = loc[2:]
    field = ".".join(str(part) for part in loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}{field + ': ' if field else ''}{message}"


@lru_cache
def get_registry() -> Registry:
    return load_registry(get_settings().models_file)


class ModelObject(Schema):
    """OpenAI's Model object: an entry of the model registry."""

    id: str
    """The model's name, as requests give it."""
    object: Literal["model"] = "model"
    """Always ``model``."""
    created: int
    """Unix seconds (registry entries have no date of their own: 2025-01-01)."""
    owned_by: str
    """Who makes it (the registry's ``owned_by``)."""


class ModelList(Schema):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    """Always ``list``."""
    data: list[ModelObject]
    """Every model this service serves."""
