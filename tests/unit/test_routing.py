"""Deployments, fallbacks and prices in the registry (issue 26's contract), and the
order a call's targets are tried in (shared/jobs/routing.py)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.jobs.routing import Cooldowns, targets
from shared.jobs.schemas import GenerationParams
from shared.registry import Price, RegistryError, UpstreamModel, load_registry

CAPS = {"sizes": ["1024x1024", "256x256"], "max_n": 4}


def _deployment(name: str, weight: float = 1, key: str = "ROUTING_KEY") -> dict[str, Any]:
    return {
        "id": name,
        "provider": "openai",
        "base_url": f"http://{name}.test/v1",
        "api_key_env": key,
        "upstream_model": "gpt-image-1",
        "weight": weight,
    }


def _load(tmp_path: Path, models: list[dict[str, Any]]) -> Any:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return load_registry(path)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTING_KEY", "sk-test")


def test_an_entry_of_deployments_needs_no_provider_of_its_own(tmp_path: Path) -> None:
    registry = _load(
        tmp_path,
        [{"name": "gpt-image-1", "capabilities": CAPS, "deployments": [_deployment("a")]}],
    )
    spec = registry.get("gpt-image-1")
    assert isinstance(spec, UpstreamModel)
    assert [d.id for d in spec.upstreams()] == ["a"]
    assert spec.served_by(spec.deployments[0]).base_url == "http://a.test/v1"


def test_an_entry_without_deployments_is_its_own_one(tmp_path: Path) -> None:
    registry = _load(
        tmp_path,
        [{"name": "m", "provider": "openai", "base_url": "http://m.test/v1", "capabilities": CAPS}],
    )
    (only,) = registry.get("m").upstreams()
    assert (only.id, only.base_url) == ("m", "http://m.test/v1")


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            [{"name": "a", "provider": "procedural", "capabilities": CAPS, "fallbacks": ["zz"]}],
            "model 'a': fallbacks: there is no model 'zz'",
        ),
        (
            [
                {"name": "a", "provider": "procedural", "capabilities": CAPS, "fallbacks": ["b"]},
                {"name": "b", "provider": "procedural", "capabilities": CAPS, "fallbacks": ["a"]},
            ],
            "model 'a': fallbacks: a cycle (a -> b -> a)",
        ),
        (
            [
                {
                    "name": "a",
                    "capabilities": CAPS,
                    "deployments": [_deployment("x", key="NO_KEY")],
                },
            ],
            "model 'a': deployment 'x': NO_KEY is not set",
        ),
        (
            [
                {
                    "name": "a",
                    "capabilities": CAPS,
                    "deployments": [_deployment("x"), _deployment("x")],
                },
            ],
            "model 'a': deployments: two deployments have the id 'x'",
        ),
    ],
)
def test_routing_mistakes_are_refused_at_start_naming_the_entry(
    tmp_path: Path, models: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        _load(tmp_path, models)
    assert str(caught.value).endswith(message)


def test_a_price_by_image_by_size_and_quality_or_by_token() -> None:
    price = Price(per_image=0.04, per_image_by={"1024x1024/low": 0.011, "256x256": 0.02})
    assert price.cost("1024x1024", "low", 2, None) == pytest.approx(0.022)
    assert price.cost("256x256", "high", 3, None) == pytest.approx(0.06)
    assert price.cost("1024x1024", "high", 1, None) == pytest.approx(0.04)
    tokens = Price.model_validate({"per_token": {"input": 5e-6, "output": 4e-5}})
    usage = {"input_tokens": 100, "output_tokens": 1000}
    assert tokens.cost("1024x1024", None, 1, usage) == pytest.approx(0.0405)
    assert Price().cost("1024x1024", None, 1, None) is None


def test_deployments_are_tried_by_weight_and_cooling_ones_skipped(tmp_path: Path) -> None:
    registry = _load(
        tmp_path,
        [
            {
                "name": "m",
                "capabilities": CAPS,
                "deployments": [_deployment("heavy", 9), _deployment("light", 1)],
                "fallbacks": ["small", "procedural"],
            },
            {"name": "small", "provider": "procedural", "capabilities": {"sizes": ["256x256"]}},
            {"name": "procedural", "provider": "procedural", "capabilities": CAPS},
        ],
    )
    params = GenerationParams(model="m", prompt="p", n=1, size="1024x1024")
    cooldowns = Cooldowns()
    rng = random.Random(7)
    firsts = [targets(registry.get("m"), params, registry, cooldowns, rng)[0] for _ in range(1000)]
    heavy = sum(t.deployment == "heavy" for t in firsts)
    assert 850 < heavy < 950  # 9 of 10
    order = targets(registry.get("m"), params, registry, cooldowns, rng)
    # "small" cannot take 1024x1024: skipped; procedural after the deployments.
    assert [t.served_by["model"] for t in order] == ["m", "m", "procedural"]
    cooldowns.cool(order[0], 30)
    after = targets(registry.get("m"), params, registry, cooldowns, rng)
    assert order[0].deployment not in [t.deployment for t in after if t.model == "m"]
    assert cooldowns.shortest() == pytest.approx(30, abs=1)


def test_a_deployment_whose_cooldown_ended_is_probed_by_one_call(tmp_path: Path) -> None:
    registry = _load(
        tmp_path,
        [{"name": "m", "capabilities": CAPS, "deployments": [_deployment("a"), _deployment("b")]}],
    )
    spec = registry.get("m")
    params = GenerationParams(model="m", prompt="p", n=1, size="1024x1024")
    cooldowns = Cooldowns()

    def tried() -> dict[str, bool]:
        """Deployment -> whether it is half open, for those a call may try."""
        found = targets(spec, params, registry, cooldowns)
        return {t.deployment: t.probe for t in found}

    (a,) = [t for t in targets(spec, params, registry, cooldowns) if t.deployment == "a"]
    cooldowns.cool(a, 0.05)
    assert tried() == {"b": False}
    time.sleep(0.06)
    assert tried() == {"a": True, "b": False}  # half open
    assert cooldowns.claim(a)  # the call about to call it probes it
    assert not cooldowns.claim(a)  # the others pass it over meanwhile
    cooldowns.cool(a, 0.05)  # the probe failed: cooling again
    assert tried() == {"b": False}
    time.sleep(0.06)
    assert cooldowns.claim(a)
    cooldowns.unclaim(a)  # not called after all (no room): another call may probe
    assert cooldowns.claim(a)
    cooldowns.healthy(a)  # the probe answered
    assert tried() == {"a": False, "b": False}
