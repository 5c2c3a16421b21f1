"""Edits and variations end to end: the `openai` package, the API, a Celery worker,
S3 (moto) for the uploads, and the fake upstream's multipart endpoints."""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from PIL import Image

from tests.support.stack import Stack


def png(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=stack.key_a, base_url=f"{stack.base_url}/v1", max_retries=0
    ) as client:
        yield client


def upstream_call(stack: Stack, path: str, prompt: str | None = None) -> dict[str, Any]:
    calls = [c for c in stack.upstream.calls if c["path"] == path]
    if prompt is not None:
        calls = [c for c in calls if c["body"].get("prompt") == prompt]
    assert calls, f"no upstream call to {path}"
    body: dict[str, Any] = calls[-1]["body"]
    return body


def test_an_edit_with_several_images_and_a_mask_is_forwarded_upstream(
    client: openai.OpenAI, stack: Stack
) -> None:
    mask = png((256, 256), (0, 0, 0, 0), "RGBA")
    result = client.images.edit(
        model="dall-e-2",
        image=[
            ("a.png", png((256, 256), (255, 0, 0)), "image/png"),
            ("b.png", png((256, 256), (0, 255, 0)), "image/png"),
        ],
        mask=("mask.png", mask, "image/png"),
        prompt="forwarded edit",
        size="256x256",
        n=2,
    )
    assert result.data is not None
    assert len(result.data) == 2
    sent = upstream_call(stack, "/v1/images/edits", "forwarded edit")
    assert sent["_files"] == {"image[]": 2, "mask": 1}
    assert sent["_sizes"] == [(256, 256)] * 3
    assert (sent["model"], sent["size"], sent["n"]) == ("dall-e-2", "256x256", 2)


def test_a_variation_is_forwarded_upstream_without_a_prompt(
    client: openai.OpenAI, stack: Stack
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dall-e-2's, still served
        result = client.images.create_variation(
            model="dall-e-2",
            image=("in.png", png((256, 256), (9, 9, 9)), "image/png"),
            size="256x256",
            response_format="b64_json",
        )
    assert result.data is not None
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert image.size == (256, 256)
    sent = upstream_call(stack, "/v1/images/variations")
    assert sent["_files"] == {"image": 1}
    assert "prompt" not in sent


def test_a_procedural_edit_keeps_its_inputs_under_the_job(stack: Stack) -> None:
    with stack.client() as http:
        resp = http.post(
            "/v1/images/edits",
            headers={"Prefer": "respond-async"},
            files={"image": ("in.png", png((64, 64), (200, 0, 0)), "image/png")},
            data={"model": "procedural", "prompt": "stored inputs", "size": "64x64"},
        )
        assert resp.status_code == 202, resp.text
        job = stack.wait_job(resp.json()["id"])
    assert job["status"] == "succeeded"
    [key] = job["request"]["images"]
    assert key.endswith(f"/{job['id']}/input-0.png")
    assert job["request"]["operation"] == "edit"
    assert job["result"]["data"][0]["url"]


def test_a_streamed_edit_iterates_to_the_completed_image(client: openai.OpenAI) -> None:
    events = list(
        client.images.edit(
            model="procedural",
            image=("in.png", png((128, 128), (0, 0, 200)), "image/png"),
            prompt="a streamed edit",
            size="256x256",
            stream=True,
            partial_images=1,
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    final = Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))
    assert final.size == (256, 256)
