"""A request's ``lora`` (issue 30) through the API: checked at the edge against the
model's adapters, each answer in its surface's own shape, resolved with default
scales, and recorded on the job and its trace call."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.conftest import Service
from tests.support.models_file import models_added

MODEL = "lora-local"
ADAPTERS = {"ink": {"path": "/adapters/ink", "default_scale": 0.7}, "paper": {"path": "/p"}}


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local model with two adapters; nothing here loads it (the jobs stay queued)."""
    entry = {
        "name": MODEL,
        "provider": "diffusers",
        "model_path": "/models/never-loaded",
        "device": "cpu",
        "preload": False,
        "capabilities": {"sizes": ["64x64"], "max_n": 2},
        "adapters": ADAPTERS,
    }
    with models_added(tmp_path_factory.mktemp("lora"), [entry]):
        yield


@pytest.fixture
def client(service: Service, lora_model: None) -> TestClient:
    return service.client(service.create_key("lora-requests"))


REFUSALS: list[tuple[str, Any, str, str]] = [
    # (case, lora, param, in the message)
    ("unknown name", [{"name": "ink"}, {"name": "oil"}], "lora.1.name", "'ink', 'paper'"),
    ("named twice", [{"name": "ink"}, {"name": "ink", "scale": 1}], "lora.1.name", "twice"),
    ("scale above 2", [{"name": "ink", "scale": 2.5}], "lora.0.scale", "less than or equal to 2"),
    ("scale below -2", [{"name": "ink", "scale": -3}], "lora.0.scale", "greater than or equal"),
    ("scale not a number", [{"name": "ink", "scale": "1"}], "lora.0.scale", "valid number"),
    ("too many", [{"name": "ink"}] * 5, "lora", "at most 4"),
    ("a misspelt key", [{"name": "ink", "weight": 1}], "lora.0.weight", "Extra inputs"),
    ("no name", [{"scale": 1}], "lora.0.name", "Missing"),
    ("not a list", {"name": "ink"}, "lora", "valid list"),
]


@pytest.mark.parametrize(
    ("lora", "param", "says"), [case[1:] for case in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_a_bad_lora_is_400_naming_the_field(
    client: TestClient, lora: Any, param: str, says: str
) -> None:
    resp = client.post(
        "/v1/images/generations", json={"model": MODEL, "prompt": "a fox", "lora": lora}
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert error["code"] in ("invalid_value", "missing_required_parameter")
    assert says in error["message"]


def test_a_model_without_adapters_refuses_lora_but_not_an_empty_list(client: TestClient) -> None:
    resp = client.post(
        "/v1/images/generations",
        json={"model": "procedural", "prompt": "a fox", "lora": [{"name": "ink"}]},
    )
    assert resp.status_code == 400
    assert resp.json()["error"] == {
        "message": "The model 'procedural' does not support 'lora'.",
        "type": "invalid_request_error",
        "param": "lora",
        "code": "invalid_value",
    }
    empty = {"model": "procedural", "prompt": "a fox", "size": "64x64", "lora": []}
    assert client.post("/v1/images/generations", json=empty).status_code == 200


def call_of(client: TestClient, key: str, job: dict[str, Any]) -> dict[str, Any]:
    weave = {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}
    read = {"project_id": "lora-recorded", "id": job["call_id"]}
    call = client.post("/call/read", headers=weave, json=read).json()["call"]
    assert call is not None
    return dict(call)


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 90)).save(out, "PNG")
    return out.getvalue()


def test_default_scales_are_filled_in_and_recorded_on_the_job_and_its_trace(
    service: Service, lora_model: None
) -> None:
    key = service.create_key("lora-recorded")
    client = service.client(key)
    asked = [{"name": "paper", "scale": -0.5}, {"name": "ink"}]
    resolved = [{"name": "paper", "scale": -0.5}, {"name": "ink", "scale": 0.7}]
    with service.paused():
        made = client.post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async"},
            json={"model": MODEL, "prompt": "a fox", "lora": asked},
        )
        # The edit form takes it as JSON text.
        edit = client.post(
            "/v1/images/edits",
            headers={"Prefer": "respond-async"},
            files={"image": ("in.png", png(), "image/png")},
            data={"model": MODEL, "prompt": "a fox", "lora": json.dumps(asked)},
        )
        bad_form = client.post(
            "/v1/images/edits",
            files={"image": ("in.png", png(), "image/png")},
            data={"model": MODEL, "prompt": "a fox", "lora": "ink"},
        )
        jobs = [made.json(), edit.json()]
        for job in jobs:
            assert job["request"]["lora"] == resolved  # the job's public view
            assert client.get(f"/v1/images/jobs/{job['id']}").json()["request"]["lora"] == resolved
            assert call_of(client, key, job)["inputs"]["lora"] == resolved
        for job in jobs:
            client.post(f"/v1/images/jobs/{job['id']}/cancel")
    assert (made.status_code, edit.status_code) == (202, 202), (made.text, edit.text)
    assert bad_form.status_code == 400
    assert bad_form.json()["error"]["param"] == "lora"
    assert "JSON text" in bad_form.json()["error"]["message"]


def test_a_variation_does_not_take_lora(client: TestClient) -> None:
    resp = client.post(
        "/v1/images/variations",
        files={"image": ("in.png", png(), "image/png")},
        data={"model": MODEL, "lora": json.dumps([{"name": "ink"}])},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "lora"


def test_the_weave_surface_checks_lora_and_answers_in_its_own_shape(client: TestClient) -> None:
    resp = client.post(
        "/image/create",
        json={
            "project_id": "lora-requests",
            "inputs": {"model": MODEL, "prompt": "a fox", "lora": [{"name": "oil"}]},
        },
    )
    assert resp.status_code == 200  # as Weave's reference: the failure is the response
    answer = resp.json()
    assert answer["weave_call_id"] is None
    assert "has no such adapter" in answer["response"]["error"]
    assert "'ink', 'paper'" in answer["response"]["error"]
