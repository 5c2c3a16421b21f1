"""The built-in models: what the registry serves without a models file.

The ``procedural`` model always; OpenAI's image models, with the limits OpenAI
documents, when ``OPENAI_API_KEY`` is set (at ``OPENAI_BASE_URL`` if given).
"""

from __future__ import annotations

import os
from typing import Any

from shared.registry.entries import (
    OUTPUT_FORMATS,
    Capabilities,
    ModelSpec,
    ProceduralModel,
    SizeRule,
    UpstreamModel,
)

PROCEDURAL = ProceduralModel(
    name="procedural",
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
        "base_url": base_url,
        "api_key_env": "OPENAI_API_KEY",
        "owned_by": "openai",
    }
    return [
        UpstreamModel(
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
        UpstreamModel(
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
            UpstreamModel(
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


def builtin_models() -> list[ModelSpec]:
    """What the registry serves without a models file."""
    models: list[ModelSpec] = [PROCEDURAL]
    if os.environ.get("OPENAI_API_KEY"):
        models += openai_models(os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    return models
