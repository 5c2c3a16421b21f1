"""Local model entries in the models file: defaults, and misconfiguration caught
when the registry loads, named by entry and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from shared.core.settings import Settings
from shared.registry import (
    DiffusersModel,
    ProceduralModel,
    RegistryError,
    UpstreamModel,
    load_registry,
    model_spec,
)
from tests.support.stack import models_yaml
from worker.supervisor import consumer_args


def local_entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "sd15",
        "provider": "diffusers",
        "model_path": "/models/sd15",
        "capabilities": {"sizes": ["512x512", "768x512"], "max_n": 4},
    }
    entry.update(overrides)
    return entry


def load(tmp_path: Path, *entries: dict[str, Any]) -> Any:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": list(entries)}))
    return load_registry(path)


def test_a_local_model_runs_on_the_gpu_queue_takes_seeds_and_maps_quality_to_steps(
    tmp_path: Path,
) -> None:
    registry = load(tmp_path, local_entry(quality_steps={"low": 10, "high": 50}, steps=30))
    spec = registry.get("sd15")
    assert spec.queue == "gpu"
    assert spec.capabilities.seed is True
    assert sorted(spec.capabilities.qualities) == ["high", "low"]
    assert (spec.steps_for("low"), spec.steps_for("high"), spec.steps_for(None)) == (10, 50, 30)
    assert registry.local_queues == {"gpu"}


def test_an_entry_may_name_its_own_queue(tmp_path: Path) -> None:
    assert load(tmp_path, local_entry(queue="gpu-large")).local_queues == {"gpu-large"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_path": None}, "model 'sd15': model_path: a local model needs one"),
        ({"device": "gpu0"}, "model 'sd15': device: 'gpu0' is not auto, cpu, mps, cuda or cuda:N"),
        ({"dtype": "int8"}, "model 'sd15': dtype: Input should be 'auto'"),
        ({"steps": 0}, "model 'sd15': steps: Input should be greater than or equal to 1"),
        (
            {"capabilities": {"sizes": ["500x500"], "max_n": 1}},
            "model 'sd15': capabilities.sizes: '500x500' is not WIDTHxHEIGHT, multiples of 8",
        ),
        (
            {
                "quality_steps": {"ultra": 80},
                "capabilities": {"sizes": ["512x512"], "qualities": ["low"]},
            },
            "model 'sd15': quality_steps: 'ultra' is not among capabilities.qualities",
        ),
        ({"pipeline": "os.system"}, "model 'sd15': pipeline: 'os.system' is not a diffusers class"),
        ({"vae_tile": True}, "model 'sd15': vae_tile: Extra inputs are not permitted"),
    ],
)
def test_misconfiguration_is_refused_naming_the_entry_and_field(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        load(tmp_path, local_entry(**overrides))
    assert message in str(caught.value)
    assert str(tmp_path / "models.yaml") in str(caught.value)


def test_local_fields_on_a_remote_model_are_refused(tmp_path: Path) -> None:
    remote = {
        "name": "dall-e-2",
        "provider": "openai",
        "base_url": "http://upstream",
        "steps": 30,
        "capabilities": {"sizes": ["256x256"]},
    }
    with pytest.raises(RegistryError) as caught:
        load(tmp_path, remote)
    assert "model 'dall-e-2': steps: only a 'diffusers' model takes it, not an 'openai' one" in str(
        caught.value
    )
    # The refusal is pydantic's own: each kind of entry forbids the others' fields.
    with pytest.raises(ValidationError) as refused:
        model_spec(remote)
    assert [(e["loc"], e["type"]) for e in refused.value.errors()] == [
        (("openai", "steps"), "extra_forbidden")
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"provider": "procedural", "base_url": "http://upstream"},
            "model 'm': base_url: only an 'openai' model takes it, not a 'procedural' one",
        ),
        (
            {"provider": "diffusers", "model_path": "/m", "upstream_model": "x"},
            "model 'm': upstream_model: only an 'openai' model takes it, not a 'diffusers' one",
        ),
        ({}, "model 'm': provider: Field required"),
        (
            {"provider": "comfy"},
            "model 'm': provider: Input should be 'procedural', 'openai', 'azure_openai', "
            "'google', 'bedrock', 'stability', 'replicate', 'fal', 'comfyui' or 'diffusers'",
        ),
    ],
)
def test_an_entry_takes_only_its_providers_fields(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        load(tmp_path, {"name": "m", "capabilities": {"sizes": ["512x512"]}, **entry})
    assert message in str(caught.value)


def test_each_provider_has_its_own_kind_of_entry(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(models_yaml("http://upstream.test/v1")))
    kinds = {spec.name: type(spec) for spec in load_registry(path).models}
    assert kinds["procedural"] is ProceduralModel
    assert kinds["dall-e-2"] is UpstreamModel
    assert {type(spec) for spec in load(tmp_path, local_entry()).models} == {DiffusersModel}


def test_local_queues_get_a_consumer_of_their_own_holding_its_gpu_slots() -> None:
    settings = Settings(broker_url="redis://localhost:6379/0", gpu_worker_slots=24)
    both = consumer_args(settings, ["default", "webhooks", "gpu"], None, True, {"gpu"})
    assert both == [
        ["--queues", "default,webhooks"],
        ["--queues", "gpu", "--concurrency", "24", "--no-sweeper"],
    ]
    alone = consumer_args(settings, ["gpu"], None, True, {"gpu"})
    assert alone == [["--queues", "gpu", "--concurrency", "24"]]


def test_the_supervisor_names_its_broker_without_a_password(tmp_path: Path) -> None:
    from worker.supervisor import _broker_name

    embedded = _broker_name(Settings(data_dir=tmp_path))
    assert embedded.startswith("the embedded broker in ")
    assert "IMAGEGEN_BROKER_URL unset" in embedded
    remote = _broker_name(Settings(broker_url="redis://user:s3cret@redis.internal:6379/0"))
    assert remote == "redis://redis.internal:6379/0"
