"""A provider that is a queue itself (issue 27), end to end: real Celery workers,
Redis, PostgreSQL and S3 (moto), and a fake Replicate speaking its published
HTTP API (tests/support/fakes/replicate.py). The worker submits a prediction once,
records it on the job and looks again later without holding a slot; a worker
SIGKILLed while the prediction is pending is replaced and the job resumes from the
record without a second submit; canceling the job cancels the prediction."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.support.fakes.replicate import EXPECTED_TOKEN, FakeReplicate
from tests.support.processes import wait_for
from tests.support.stack import Stack

ENV = {"REPLICATE_API_TOKEN": EXPECTED_TOKEN}


@pytest.fixture(scope="module")
def replicate() -> Iterator[FakeReplicate]:
    fake = FakeReplicate(polls=3).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def queued(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, replicate: FakeReplicate
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
    stack = Stack(
        tmp_path_factory.mktemp("queued"),
        s3_endpoint,
        worker_env=ENV,
        api_env=ENV,
        extra_models=[model],
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
