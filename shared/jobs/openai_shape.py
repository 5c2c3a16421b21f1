"""The fields OpenAI's published schema allows an Images API answer, by model kind.

OpenAI's own OpenAPI document (openai/openai-openapi's ``openapi.yaml``; the copy
the tests validate against is ``tests/contract/openai_images.yaml``) gives
``ImagesResponse`` a top-level ``size``, ``quality``, ``background``,
``output_format`` and ``usage`` that OpenAI sends for its GPT image models only,
each inside an enum: sizes 1024x1024, 1024x1536 and 1536x1024; qualities low,
medium and high; backgrounds transparent and opaque. Clients generated from that
document with strict enums fail on any other value, so:

- a model answering like dall-e-2 and dall-e-3 (``answer_shape: dall-e`` in the
  registry: procedural, local and OpenAI-compatible models unless they say
  otherwise) answers ``created`` and ``data`` only;
- a GPT-image-like model (``answer_shape: gpt-image``) adds those fields where
  the value is one the enum lists, and leaves a field out otherwise (a 64x64 or
  free-form size, ``auto`` or ``hd`` quality, ``auto`` background), and ``usage``
  only where the provider reported the token counts the schema requires.

The streamed events (``image_generation.*``, ``image_edit.*``) require ``size``,
``quality``, ``background`` and ``output_format``, with ``auto`` allowed: a value
outside their enums is sent as ``auto``, and the completed event's required
``usage`` is zeros where the provider counts no tokens.
"""

from __future__ import annotations

from typing import Any

from shared.jobs.schemas import GenerationParams
from shared.registry import AnswerShape as AnswerShape

SIZES = ("1024x1024", "1024x1536", "1536x1024")
QUALITIES = ("low", "medium", "high")
BACKGROUNDS = ("transparent", "opaque")
OUTPUT_FORMATS = ("png", "webp", "jpeg")

# The usage the completed event always carries where the provider counts no tokens.
NO_USAGE: dict[str, Any] = {
    "input_tokens": 0,
    "output_tokens": 0,
    "total_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
}


def response_fields(
    shape: AnswerShape, params: GenerationParams, usage: dict[str, Any] | None
) -> dict[str, Any]:
    """ImagesResponse's fields beside ``created`` and ``data``."""
    if shape != "gpt-image":
        return {}
    fields: dict[str, Any] = {}
    for name, allowed in (
        ("size", SIZES),
        ("quality", QUALITIES),
        ("background", BACKGROUNDS),
        ("output_format", OUTPUT_FORMATS),
    ):
        value = getattr(params, name)
        if value in allowed:
            fields[name] = value
    tokens = token_usage(usage)
    if tokens is not None:
        fields["usage"] = tokens
    return fields


def event_fields(params: GenerationParams) -> dict[str, str]:
    """The fields every streamed partial and completed event must carry."""
    return {
        "size": params.size if params.size in SIZES else "auto",
        "quality": params.quality if params.quality in QUALITIES else "auto",
        "background": params.background if params.background in BACKGROUNDS else "auto",
        "output_format": params.output_format,
    }


def token_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """The provider's usage as OpenAI's ImageGenUsage has it (integer input, output
    and total tokens, with input_tokens_details' text and image tokens; output
    details where given whole), or None where it lacks any required count."""
    if not usage:
        return None
    counts = {name: usage.get(name) for name in ("input_tokens", "output_tokens", "total_tokens")}
    if not all(_is_count(value) for value in counts.values()):
        return None
    out: dict[str, Any] = dict(counts)
    for name in ("input_tokens_details", "output_tokens_details"):
        details = usage.get(name)
        if isinstance(details, dict) and all(
            _is_count(details.get(k)) for k in ("text_tokens", "image_tokens")
        ):
            out[name] = {k: details[k] for k in ("text_tokens", "image_tokens")}
    return out if "input_tokens_details" in out else None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
