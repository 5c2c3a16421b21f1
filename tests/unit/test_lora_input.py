"""A request's ``lora`` as the edge resolves it (shared/jobs/input.py), and where a
fallback model may take it."""

from __future__ import annotations

from typing import Any

import pytest

from shared.core.errors import InvalidRequest
from shared.jobs.input import for_fallback, parse_request, validate_generation
from shared.jobs.schemas import MAX_LORAS, LoraChoice
from shared.registry import PROCEDURAL, DiffusersModel, Registry


def local(name: str, adapters: dict[str, Any]) -> DiffusersModel:
    return DiffusersModel.model_validate(
        {
            "name": name,
            "provider": "diffusers",
            "model_path": f"/models/{name}",
            "capabilities": {"sizes": ["512x512"], "max_n": 4},
            "adapters": adapters,
        }
    )


STYLED = local("styled", {"ink": {"path": "/i", "default_scale": 0.6}, "oil": {"path": "/o"}})
REGISTRY = Registry(models=[STYLED, PROCEDURAL])


def validate(lora: Any, model: str = "styled") -> Any:
    body = {"model": model, "prompt": "a fox", "lora": lora}
    return validate_generation(parse_request(body), REGISTRY)


def test_default_scales_are_filled_in_in_the_requests_order() -> None:
    params = validate([{"name": "oil"}, {"name": "ink", "scale": -1.25}])
    assert params.lora == [LoraChoice(name="oil", scale=1.0), LoraChoice(name="ink", scale=-1.25)]
    assert validate([{"name": "ink"}]).lora == [LoraChoice(name="ink", scale=0.6)]
    assert validate(None).lora == validate([]).lora == []


def test_at_most_max_loras_and_each_name_once() -> None:
    four = [{"name": "ink", "scale": s} for s in (0.1, 0.2, 0.3, 0.4)]
    with pytest.raises(InvalidRequest) as twice:
        validate(four[:2])
    assert twice.value.param == "lora.1.name"
    with pytest.raises(InvalidRequest) as many:
        validate([{"name": f"a{i}"} for i in range(MAX_LORAS + 1)])
    assert many.value.param == "lora"  # refused before any name is looked at


def test_an_unknown_adapter_lists_the_models_adapters() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate([{"name": "watercolour"}])
    assert info.value.param == "lora.0.name"
    assert info.value.code == "invalid_value"
    assert "'styled' has no such adapter. Its adapters are: 'ink', 'oil'." in info.value.message


def test_a_fallback_without_the_adapters_is_skipped_one_with_them_takes_them() -> None:
    params = validate([{"name": "ink"}])
    assert for_fallback(params, PROCEDURAL) is None
    assert for_fallback(params, local("other", {"oil": {"path": "/o"}})) is None
    twin = for_fallback(params, local("twin", {"ink": {"path": "/twin-ink"}}))
    assert twin is not None
    # The scale the job resolved goes along, not the fallback's default.
    assert twin.lora == [LoraChoice(name="ink", scale=0.6)]
    # A request without adapters falls back as before.
    plain = for_fallback(
        validate([]), PROCEDURAL.model_copy(update={"capabilities": STYLED.capabilities})
    )
    assert plain is not None
    assert plain.lora == []
