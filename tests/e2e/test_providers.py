"""Providers beyond OpenAI's protocol (issue 27), end to end: real Celery workers,
Redis, PostgreSQL and S3 (moto), and a fake per provider speaking its published
API (tests/support/fakes/). Every kind answers through the `openai` package. A
provider that is a queue itself (Replicate): the worker submits a prediction once,
records it on the job and looks again later without holding a slot; a worker
SIGKILLed while the prediction is pending is replaced and the job resumes from the
record without a second submit; canceling the job cancels the prediction."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from PIL import Image

from tests.support.fakes import azure_openai, bedrock, comfyui, fal, google, stability
from tests.support.fakes.replicate import EXPECTED_TOKEN, FakeReplicate
from tests.support.processes import wait_for
from tests.support.stack import Stack

ENV = {
    "REPLICATE_API_TOKEN": EXPECTED_TOKEN,
    "AZURE_E2E_KEY": azure_openai.EXPECTED_KEY,
    "STABILITY_E2E_KEY": stability.EXPECTED_KEY,
    "GOOGLE_E2E_KEY": google.EXPECTED_KEY,
    "FAL_E2E_KEY": fal.EXPECTED_KEY,
    # Bedrock signs with the AWS chain; moto's S3 takes any credentials.
    "AWS_ACCESS_KEY_ID": bedrock.ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": bedrock.SECRET_KEY,
}
ONE = {"sizes": ["1024x1024"], "max_n": 2, "upstream_max_n": 1}


@pytest.fixture(scope="module")
def others() -> Iterator[dict[str, Any]]:
    """A fake of every other kind, each on its own port."""
    fakes: dict[str, Any] = {
        "azure": azure_openai.FakeAzureOpenAI().start(),
        "stability": stability.FakeStability().start(),
        "google": google.FakeGoogle().start(),
        "bedrock": bedrock.FakeBedrock().start(),
        "fal": fal.FakeFal(polls=2).start(),
        "comfyui": comfyui.FakeComfyUI().start(),
    }
    yield fakes
    for fake in fakes.values():
        fake.stop()


def _other_models(fakes: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": "e2e-azure",
            "provider": "azure_openai",
            "base_url": fakes["azure"].base_url,
            "api_key_env": "AZURE_E2E_KEY",
            "api_version": "2025-04-01-preview",
            "upstream_model": "dalle3",
            "capabilities": ONE,
        },
        {
            "name": "e2e-stability",
            "provider": "stability",
            "base_url": fakes["stability"].base_url,
            "api_key_env": "STABILITY_E2E_KEY",
            "upstream_model": "core",
            "capabilities": ONE,
        },
        {
            "name": "e2e-gemini",
            "provider": "google",
            "base_url": fakes["google"].base_url,
            "api_key_env": "GOOGLE_E2E_KEY",
            "upstream_model": "gemini-2.5-flash-image",
            "capabilities": ONE,
        },
        {
            "name": "e2e-nova",
            "provider": "bedrock",
            "region": bedrock.REGION,
            "base_url": fakes["bedrock"].base_url,
            "upstream_model": "amazon.nova-canvas-v1:0",
            "capabilities": ONE,
        },
        {
            "name": "e2e-fal",
            "provider": "fal",
            "base_url": fakes["fal"].base_url,
            "api_key_env": "FAL_E2E_KEY",
            "upstream_model": "fal-ai/flux/dev",
            "poll_seconds": 0.3,
            "capabilities": ONE,
        },
        {
            "name": "e2e-comfyui",
            "provider": "comfyui",
            "base_url": fakes["comfyui"].base_url,
            "workflow": str(comfyui.WORKFLOW_FILE),
            "workflow_inputs": comfyui.INPUTS,
            "poll_seconds": 0.3,
            "capabilities": {"sizes": ["64x64"], "max_n": 2, "upstream_max_n": 2},
        },
    ]


@pytest.fixture(scope="module")
def replicate() -> Iterator[FakeReplicate]:
    fake = FakeReplicate(polls=3).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def queued(
    tmp_path_factory: pytest.TempPathFactory,
    s3_endpoint: str,
    replicate: FakeReplicate,
    others: dict[str, Any],
) -> Iterator[Stack]:
    model: dict[str, Any] = {
        "name": "flux",
        "provider": "replicate",
        "base_url": replicate.base_url,
        "api_key_env": "REPLICATE_API_TOKEN",
        "upstream_model": "black-forest-labs/flux-schnell",
        "poll_seconds": 0.3,
        "capabilities": {"sizes": ["1024x1024"], "max_n": 4},
    }
    editor = {  # FLUX Kontext: its input_image, file_inputs' default
        **model,
        "name": "flux-kontext",
        "upstream_model": "black-forest-labs/flux-kontext-pro",
        "capabilities": {"sizes": ["auto"], "edits": True},
    }
    stack = Stack(
        tmp_path_factory.mktemp("queued"),
        s3_endpoint,
        worker_env=ENV,
        api_env=ENV,
        extra_models=[model, editor, *_other_models(others)],
    )
    try:
        yield stack
    finally:
        stack.close()


def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as client:
        body: dict[str, Any] = client.get(f"/v1/images/jobs/{job_id}").json()
    return body


def test_a_prediction_answers_through_the_openai_package(
    queued: Stack, replicate: FakeReplicate
) -> None:
    with openai.OpenAI(
        api_key=queued.key_a, base_url=f"{queued.base_url}/v1", max_retries=0, timeout=60
    ) as client:
        result = client.images.generate(
            model="flux", prompt="a queued fox", n=2, size="1024x1024", response_format="url"
        )
    assert result.data is not None
    assert len(result.data) == 2
    origin = replicate.base_url.removesuffix("/v1")
    assert all(item.url and not item.url.startswith(origin) for item in result.data)  # ours
    assert len(replicate.creates_for("a queued fox")) == 1  # one prediction, looked at


def test_an_edit_through_a_queue_provider_answers_through_the_openai_package(
    queued: Stack, replicate: FakeReplicate
) -> None:
    """The input image reaches Replicate as a data URI from a real worker (read back
    from S3), and the model's edit of it comes back."""
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 20, 20)).save(buf, format="PNG")
    with openai.OpenAI(
        api_key=queued.key_a, base_url=f"{queued.base_url}/v1", max_retries=0, timeout=60
    ) as client:
        result = client.images.edit(
            model="flux-kontext",
            image=("in.png", buf.getvalue(), "image/png"),
            prompt="an e2e edit",
            response_format="b64_json",
        )
    assert result.data is not None
    assert result.data[0].b64_json is not None
    picture = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")
    assert (picture.size, picture.getpixel((10, 10))) == ((48, 32), (200, 20, 20))
    (created,) = replicate.creates_for("an e2e edit")
    assert created["body"]["input"]["input_image"].startswith("data:image/png;base64,")


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("e2e-azure", "1024x1024"),
        ("e2e-stability", "1024x1024"),
        ("e2e-gemini", "1024x1024"),
        ("e2e-nova", "1024x1024"),
        ("e2e-fal", "1024x1024"),
        ("e2e-comfyui", "64x64"),
    ],
)
def test_every_kind_answers_through_the_openai_package(
    queued: Stack, model: str, size: str
) -> None:
    """Two images from each kind's fake, through a real worker, as OpenAI's answer."""
    with openai.OpenAI(
        api_key=queued.key_a, base_url=f"{queued.base_url}/v1", max_retries=0, timeout=60
    ) as client:
        result = client.images.generate(
            model=model, prompt=f"every kind: {model}", n=2, size=size, response_format="b64_json"
        )
    assert result.data is not None
    assert len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        picture = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert picture.size[0] > 0


def test_a_worker_killed_while_its_prediction_is_pending_resumes_without_a_second_submit(
    queued: Stack, replicate: FakeReplicate
) -> None:
    replicate.polls = 5
    try:
        job = queued.submit("resume me", model="flux", size="1024x1024")
        # Recorded and looked at once (a kill between the create's answer and the
        # record's commit is the one window a second submit is left to).
        wait_for(
            lambda: "waiting for replicate" in str(_job(queued, job["id"]).get("status_detail")),
            20,
            "the prediction recorded and pending",
        )
        queued.kill_consumers()
        done = queued.wait_job(job["id"], timeout=60)
    finally:
        replicate.polls = 3
    assert done["status"] == "succeeded", done
    assert len(done["result"]["data"]) == 1
    # Waiting spends no attempt; the kill costs one only if it caught a look running.
    assert done["attempts"] <= 2
    assert len(replicate.creates_for("resume me")) == 1  # never submitted (paid) twice


def test_canceling_the_job_cancels_its_prediction(queued: Stack, replicate: FakeReplicate) -> None:
    job = queued.submit("[hold] cancel me", model="flux", size="1024x1024")
    wait_for(lambda: replicate.creates_for("cancel me"), 20, "the prediction created")
    wait_for(lambda: bool(_job(queued, job["id"]).get("status_detail")), 20, "a pending look")
    assert "waiting for replicate" in _job(queued, job["id"])["status_detail"]
    with queued.client() as client:
        resp = client.post(f"/v1/images/jobs/{job['id']}/cancel")
    assert resp.status_code == 200, resp.text
    (created,) = replicate.creates_for("cancel me")
    prediction_id = created.get("id") or _only_id(replicate, "cancel me")
    wait_for(lambda: prediction_id in replicate.canceled, 20, "the prediction canceled")
    time.sleep(1)
    assert replicate.prediction(prediction_id)["status"] == "canceled"


def _only_id(fake: FakeReplicate, marker: str) -> str:
    with fake.served.lock:
        (found,) = [pid for pid, p in fake.predictions.items() if marker in p["input"]["prompt"]]
    return found
