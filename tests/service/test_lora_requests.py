"""A request's ``lora`` (issue 30) through the API: checked at the edge against the
model's adapters, each answer in its surface's own shape, resolved with default
scales, and recorded on the job and its trace call."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.conftest import Service
from tests.support.models_file import models_added
from tests.support.tiny_diffusion import build_tiny_lora, build_tiny_sd

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


def call_of(
    client: TestClient, key: str, job: dict[str, Any], project: str = "lora-recorded"
) -> dict[str, Any]:
    weave = {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}
    read = {"project_id": project, "id": job["call_id"]}
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


@pytest.fixture(scope="module")
def tiny_with_lora(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny pipeline with a tiny LoRA, served by the in-process worker."""
    folder = tmp_path_factory.mktemp("tiny-lora-model")
    model = build_tiny_sd(folder)
    entry = {
        "name": "tiny-lora",
        "provider": "diffusers",
        "model_path": str(model),
        "device": "cpu",
        "steps": 3,
        "preload": False,
        "capabilities": {"sizes": ["32x32"], "max_n": 2},
        "adapters": {"ink": {"path": str(build_tiny_lora(model, folder / "ink"))}},
    }
    with models_added(folder, [entry]):
        yield "tiny-lora"


def test_a_job_with_an_adapter_runs_with_it_and_one_without_gets_the_plain_image(
    service: Service, tiny_with_lora: str
) -> None:
    client = service.client()

    def made(**extra: Any) -> str:
        body = {"model": tiny_with_lora, "prompt": "a fox", "seed": 5, "size": "32x32"}
        resp = client.post(
            "/v1/images/generations", json={**body, "response_format": "b64_json", **extra}
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["data"][0]["b64_json"])

    plain = made()
    inked = made(lora=[{"name": "ink"}])
    assert inked != plain
    assert made() == plain  # switched off again: nothing leaks into the next job
    assert made(lora=[{"name": "ink", "scale": 0}]) == plain


def test_weave_records_the_adapters_as_applied_on_its_call(
    service: Service, tiny_with_lora: str
) -> None:
    key = service.create_key("lora-weave")
    client = service.client(key)
    inputs = {
        "model": tiny_with_lora,
        "prompt": "a fox",
        "size": "32x32",
        "lora": [{"name": "ink"}],
    }
    answer = client.post("/image/create", json={"project_id": "lora-weave", "inputs": inputs})
    assert answer.status_code == 200, answer.text
    assert "data" in answer.json()["response"], answer.json()
    call = call_of(client, key, {"call_id": answer.json()["weave_call_id"]}, "lora-weave")
    assert call["inputs"]["lora"] == [{"name": "ink", "scale": 1.0}]


def test_a_batch_line_takes_lora_and_a_bad_one_fails_alone(
    service: Service, tiny_with_lora: str
) -> None:
    client = service.client()
    line = {"model": tiny_with_lora, "prompt": "a fox", "size": "32x32"}
    made = client.post(
        "/v1/images/batches",
        json={
            "requests": [{**line, "lora": [{"name": "ink"}]}, {**line, "lora": [{"name": "oil"}]}]
        },
    )
    assert made.status_code == 200, made.text
    batch = f"/v1/images/batches/{made.json()['id']}"
    deadline = time.monotonic() + 30
    while client.get(batch).json()["status"] != "completed":
        assert time.monotonic() < deadline, client.get(batch).json()
        time.sleep(0.05)
    good, bad = client.get(f"{batch}/items").json()["data"]
    assert good["status"] == "succeeded", good
    job = client.get(f"/v1/images/jobs/{good['job_id']}").json()
    assert job["request"]["lora"] == [{"name": "ink", "scale": 1.0}]
    error = bad["response"]["body"]["error"]
    assert (bad["status"], error["param"]) == ("failed", "lora.0.name")
    assert "no such adapter" in error["message"]
