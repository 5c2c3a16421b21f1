"""Transient upstream faults are retried; permanent ones fail the job at once."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from tests.support.stack import Stack


def generate(stack: Stack, prompt: str, **extra: object) -> tuple[int, dict[str, Any]]:
    body = {
        "model": "fake-fast",
        "prompt": prompt,
        "size": "64x64",
        "response_format": "b64_json",
        **extra,
    }
    with stack.client() as client:
        resp = client.post("/v1/images/generations", json=body)
    return resp.status_code, resp.json()


def test_429_with_retry_after_is_retried_and_succeeds(stack: Stack) -> None:
    status, body = generate(stack, "[429-once] retry me")
    assert status == 200, body
    assert len(body["data"]) == 1
    calls = stack.upstream.calls_for("[429-once] retry me")
    assert len(calls) == 2  # the 429, then the success


def test_500_is_retried_and_succeeds(stack: Stack) -> None:
    status, body = generate(stack, "[500-once] retry me", n=2)
    assert status == 200, body
    assert len(body["data"]) == 2
    assert len(stack.upstream.calls_for("[500-once] retry me")) == 2


def test_content_policy_fails_at_once_with_provider_message(stack: Stack) -> None:
    status, body = generate(stack, "[content-policy] forbidden")
    assert status == 400
    assert body["error"]["code"] == "content_policy_violation"
    assert "safety system" in body["error"]["message"]
    assert len(stack.upstream.calls_for("[content-policy] forbidden")) == 1  # no retry
    with stack.client() as client:
        job = client.get("/v1/images/jobs", params={"status": "failed", "limit": 1}).json()
    assert job["data"][0]["error"]["code"] == "content_policy_violation"


def test_upstream_that_never_answers_times_out_and_fails_cleanly(stack: Stack) -> None:
    status, body = generate(stack, "[hang] silence")
    assert status == 504
    assert body["error"]["code"] == "upstream_timeout"
    assert len(stack.upstream.calls_for("[hang] silence")) == 3  # provider_max_attempts


def test_garbage_image_bytes_fail_the_job_not_an_empty_success(stack: Stack) -> None:
    status, body = generate(stack, "[garbage] bytes")
    assert status in (500, 502)
    assert "data" not in body
    assert body["error"]["message"]


def test_fan_out_when_upstream_makes_one_image_per_call(stack: Stack) -> None:
    with stack.client() as client:
        resp = client.post(
            "/v1/images/generations",
            json={
                "model": "fake-n1",
                "prompt": "fan out",
                "n": 3,
                "size": "64x64",
                "response_format": "b64_json",
            },
        )
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) == 3
    for item in data:
        assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 64)
    calls = stack.upstream.calls_for("fan out")
    assert len(calls) == 3
    assert all(c["body"]["n"] == 1 for c in calls)


def test_output_format_conversion_of_upstream_png(stack: Stack) -> None:
    status, body = generate(stack, "convert me", output_format="webp")
    assert status == 200
    img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert img.format == "WEBP"
