"""Validating a generation request against the model's declared capabilities."""

from __future__ import annotations

from typing import Any

import pytest

from shared.core.errors import InvalidRequest, ModelNotFound
from shared.jobs.input import parse_request, validate_generation
from shared.registry import PROCEDURAL, Registry

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
