"""Answers carry only what OpenAI's published schema allows for the model's kind
(shared/jobs/openai_shape.py); the full check against the document itself is
tests/e2e/test_openai_schema.py."""

from __future__ import annotations

from typing import Any

import pytest

from shared.jobs.openai_shape import event_fields, response_fields, token_usage
from shared.jobs.schemas import GenerationParams
from shared.registry import Capabilities, ModelSpec, model_spec

USAGE = {
    "input_tokens": 50,
    "output_tokens": 4160,
    "total_tokens": 4210,
    "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
}


def params(**fields: Any) -> GenerationParams:
    return GenerationParams(**{"model": "m", "prompt": "p", "n": 1, "size": "1024x1024", **fields})


def test_a_dall_e_like_answer_has_no_top_level_extras() -> None:
    assert response_fields("dall-e", params(size="256x256", quality="hd"), USAGE) == {}


def test_a_gpt_image_answer_keeps_only_values_inside_the_schemas_enums() -> None:
    listed = params(size="1536x1024", quality="high", background="transparent")
    assert response_fields("gpt-image", listed, USAGE) == {
        "size": "1536x1024",
        "quality": "high",
        "background": "transparent",
        "output_format": "png",
        "usage": USAGE,
    }
    unlisted = params(size="64x64", quality="auto", background="auto", output_format="webp")
    assert response_fields("gpt-image", unlisted, None) == {"output_format": "webp"}


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {},
        {"total_tokens": 5},  # what some upstreams report
        {**USAGE, "input_tokens_details": {"text_tokens": 1}},
        {**USAGE, "output_tokens": "7"},
        {**USAGE, "output_tokens": True},
    ],
)
def test_usage_without_every_required_count_is_left_out(usage: dict[str, Any] | None) -> None:
    assert token_usage(usage) is None


def test_usage_keeps_whole_output_details_and_drops_anything_else() -> None:
    usage = {
        **USAGE,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 4160},
        "cost": 0.04,
    }
    assert token_usage(usage) == {k: v for k, v in usage.items() if k != "cost"}


def test_stream_events_send_auto_for_values_outside_their_enums() -> None:
    assert event_fields(params(size="64x64", quality="hd", background=None)) == {
        "size": "auto",
        "quality": "auto",
        "background": "auto",
        "output_format": "png",
    }
    assert event_fields(params(size="1024x1536", quality="low", background="opaque")) == {
        "size": "1024x1536",
        "quality": "low",
        "background": "opaque",
        "output_format": "png",
    }


def entry(**fields: Any) -> ModelSpec:
    caps = Capabilities(sizes=["1024x1024"])
    return model_spec({"capabilities": caps.model_dump(), **fields})


def test_the_registry_takes_gpt_image_upstreams_as_gpt_image_unless_told() -> None:
    upstream = {"provider": "openai", "base_url": "http://u.test/v1"}
    assert entry(name="img", upstream_model="gpt-image-1", **upstream).answer_shape == "gpt-image"
    assert entry(name="gpt-image-2", **upstream).answer_shape == "gpt-image"
    assert entry(name="d2", upstream_model="dall-e-2", **upstream).answer_shape == "dall-e"
    assert entry(name="procedural", provider="procedural").answer_shape == "dall-e"
    declared = entry(name="x", provider="procedural", answer_shape="gpt-image")
    assert declared.answer_shape == "gpt-image"
    told = entry(name="g", upstream_model="gpt-image-1", answer_shape="dall-e", **upstream)
    assert told.answer_shape == "dall-e"
