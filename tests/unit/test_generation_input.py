"""Validating a generation request against the model's declared capabilities."""

from __future__ import annotations

from typing import Any

import pytest

from shared.core.errors import InvalidRequest, ModelNotFound
from shared.jobs.input import parse_request, validate_generation
from shared.registry import PROCEDURAL, Registry, openai_models

REGISTRY = Registry(models=[PROCEDURAL])


def validate(body: dict[str, Any]) -> Any:
    return validate_generation(parse_request(body), REGISTRY)


def test_defaults_are_filled_in_from_the_model() -> None:
    params = validate({"prompt": "a fox"})
    assert params.model == "procedural"
    assert params.n == 1
    assert params.size == PROCEDURAL.default_size
    assert params.response_format == "url"
    assert params.output_format == "png"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": "  "}, "prompt", "invalid_value"),
        ({"prompt": "p", "n": 11}, "n", "invalid_value"),
        ({"prompt": "p", "size": "3x3"}, "size", "invalid_value"),
        ({"prompt": "p", "quality": "ultra"}, "quality", "invalid_value"),
        ({"prompt": "p", "output_compression": 50}, "output_compression", "invalid_value"),
        ({"prompt": "x" * 32001}, "prompt", "string_above_max_length"),
    ],
)
def test_each_rule_names_its_param(body: dict[str, Any], param: str, code: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(body)
    assert info.value.param == param
    assert info.value.code == code
    assert info.value.status_code == 400


def test_an_unknown_model_is_404_model_not_found() -> None:
    with pytest.raises(ModelNotFound) as info:
        validate({"prompt": "p", "model": "nope"})
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        parse_request(["prompt"])


OPENAI = Registry(models=openai_models())


def test_the_gpt_image_models_are_in_the_default_registry() -> None:
    names = {spec.name for spec in OPENAI.models}
    assert {"gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2"} <= names


@pytest.mark.parametrize("size", ["2048x1152", "3840x2160", "1280x3840", "3840x1280", "16x48"])
def test_gpt_image_2_takes_free_form_sizes_within_its_bounds(size: str) -> None:
    params = validate_generation(
        parse_request({"model": "gpt-image-2", "prompt": "p", "size": size}), OPENAI
    )
    assert params.size == size


@pytest.mark.parametrize(
    ("size", "why"),
    [
        ("1000x1000", "multiples of 16"),
        ("4096x1024", "longer side must be at most 3840"),
        ("3840x2304", "at most 8294400 pixels"),
        ("3840x1264", "between 1:3 and 3:1"),
        ("axb", "give WIDTHxHEIGHT"),
        ("0x16", "give WIDTHxHEIGHT"),
    ],
)
def test_gpt_image_2_refuses_sizes_outside_its_bounds_saying_why(size: str, why: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_generation(
            parse_request({"model": "gpt-image-2", "prompt": "p", "size": size}), OPENAI
        )
    assert caught.value.param == "size"
    assert why in caught.value.message


def test_older_gpt_image_models_keep_their_listed_sizes() -> None:
    with pytest.raises(InvalidRequest):
        validate_generation(
            parse_request({"model": "gpt-image-1.5", "prompt": "p", "size": "2048x1152"}), OPENAI
        )


def test_usage_of_fanned_out_calls_sums_counts_and_their_details() -> None:
    from worker.produce import _add_usage

    total: dict[str, Any] = {}
    for _ in range(3):
        _add_usage(
            total,
            {
                "input_tokens": 10,
                "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
                "note": "ignored",
            },
        )
    assert total == {
        "input_tokens": 30,
        "input_tokens_details": {"text_tokens": 30, "image_tokens": 0},
    }


def test_an_unknown_model_lists_the_available_ones_and_says_how_to_get_openais(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelNotFound) as caught:
        validate({"model": "gpt-image-1", "prompt": "p"})
    assert "Available: procedural" in caught.value.message
    assert "OPENAI_API_KEY" in caught.value.message
