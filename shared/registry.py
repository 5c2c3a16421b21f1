"""The model registry: which public model names exist and what each can do.

Loaded from the YAML file at ``IMAGEGEN_MODELS_FILE``; without one, the built-in
``procedural`` model plus OpenAI's three image models when ``OPENAI_API_KEY`` is set.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.core.errors import ModelNotFound
from shared.core.settings import get_settings

OUTPUT_FORMATS = ("png", "jpeg", "webp")


class Capabilities(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sizes: list[str]
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

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            if size != "auto" and parse_size(size) is None:
                raise ValueError(f"bad size {size!r}")
        return sizes


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    provider: Literal["procedural", "openai"]
    upstream_model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    queue: str = "default"
    # Which response_format to ask the upstream for; None sends none (gpt-image
    # models refuse the field and always answer b64_json).
    upstream_response_format: Literal["url", "b64_json"] | None = "b64_json"
    owned_by: str = "imagegen"
    capabilities: Capabilities

    @property
    def default_size(self) -> str:
        return self.capabilities.default_size or self.capabilities.sizes[0]

    # Images one upstream call makes; above it the worker fans out in parallel calls.
    @property
    def images_per_call(self) -> int:
        return self.capabilities.upstream_max_n or self.capabilities.max_n

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Registry(BaseModel):
    models: list[ModelSpec]

    def get(self, name: str | None) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")

    @property
    def default_model(self) -> str:
        return self.models[0].name


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
    ),
)


def openai_models(base_url: str = "https://api.openai.com/v1") -> list[ModelSpec]:
    """OpenAI's three image models with the limits OpenAI documents."""
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
        ModelSpec(
            name="gpt-image-1",
            upstream_model="gpt-image-1",
            upstream_response_format=None,
            **common,
            capabilities=Capabilities(
                sizes=["auto", "1024x1024", "1536x1024", "1024x1536"],
                default_size="auto",
                max_n=10,
                qualities=["auto", "low", "medium", "high"],
                default_quality="auto",
                backgrounds=["auto", "transparent", "opaque"],
                moderations=["auto", "low"],
                output_compression=True,
                max_prompt_chars=32000,
            ),
        ),
    ]


def load_registry(path: Path | None) -> Registry:
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return Registry.model_validate(data)
    models = [PROCEDURAL]
    if os.environ.get("OPENAI_API_KEY"):
        models += openai_models(os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    return Registry(models=models)


@lru_cache
def get_registry() -> Registry:
    return load_registry(get_settings().models_file)


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
