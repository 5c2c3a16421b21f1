"""The official ``openai`` package, unmodified, against the running service."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from tests.support.stack import Stack


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=stack.key_a, base_url=f"{stack.base_url}/v1", max_retries=0
    ) as client:
        yield client


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_url_mode_returns_fetchable_image_of_requested_size_and_format(
    client: openai.OpenAI, fmt: str, pil: str
) -> None:
    result = client.images.generate(  # type: ignore[call-overload]
        model="procedural",
        prompt="a lighthouse at dusk",
        size="256x256",
        n=2,
        response_format="url",
        output_format=fmt,
    )
    assert result.data is not None
    assert len(result.data) == 2
    for item in result.data:
        assert item.url
        assert item.b64_json is None
        resp = httpx.get(item.url)
        assert resp.status_code == 200
        img = Image.open(io.BytesIO(resp.content))
        assert img.format == pil
        assert img.size == (256, 256)
    # Two different images, not one stored twice.
    assert result.data[0].url != result.data[1].url


def test_b64_mode_returns_decodable_image(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="procedural", prompt="a red fox", size="512x512", response_format="b64_json"
    )
    assert result.data is not None
    assert len(result.data) == 1
    assert result.data[0].b64_json
    img = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert (img.format, img.size) == ("PNG", (512, 512))
    assert result.created > 0


def test_default_model_and_size(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="defaults please", response_format="b64_json")
    assert result.data is not None
    assert result.data[0].b64_json
    img = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert img.size == (1024, 1024)


def test_openai_upstream_url_answer_is_rehosted(stack: Stack, client: openai.OpenAI) -> None:
    """The upstream answers with its own URL; we hand out a URL of our storage."""
    result = client.images.generate(
        model="dall-e-2", prompt="upstream url mode", size="256x256", response_format="url"
    )
    assert result.data is not None
    url = result.data[0].url
    assert url
    assert f"127.0.0.1:{stack.upstream.port}" not in url
    assert result.data[0].revised_prompt == "revised: upstream url mode"
    img = Image.open(io.BytesIO(httpx.get(url).content))
    assert img.size == (256, 256)
    call = stack.upstream.calls_for("upstream url mode")[0]
    assert call["auth"] == "Bearer sk-upstream-test"
    assert call["body"]["model"] == "dall-e-2"


def test_gpt_image_usage_is_passed_through(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="gpt-image-1",
        prompt="usage please",
        size="64x64",
        quality="low",
        response_format="b64_json",
    )
    assert result.usage is not None
    assert result.usage.total_tokens == 110
    assert result.data is not None
    assert result.data[0].b64_json


def test_models_list_and_read(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "procedural" in ids
    assert "dall-e-3" in ids
    assert client.models.retrieve("dall-e-3").id == "dall-e-3"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_an_idempotent_retry_returns_the_first_requests_images(
    client: openai.OpenAI, stack: Stack
) -> None:
    key = f"retry-{uuid.uuid4()}"

    def generate() -> list[str]:
        result = client.images.generate(
            model="procedural",
            prompt="an idempotent lighthouse",
            size="64x64",
            n=2,
            response_format="url",
            extra_headers={"Idempotency-Key": key},
        )
        assert result.data is not None
        return [(item.url or "").split("?")[0] for item in result.data]

    first, again = generate(), generate()
    assert first == again  # the same stored images: the same job, not a second one
    with pytest.raises(openai.ConflictError):
        client.images.generate(
            model="procedural", prompt="another body", extra_headers={"Idempotency-Key": key}
        )


def test_idempotent_twins_on_postgresql_make_one_job(stack: Stack) -> None:
    key = f"twins-{uuid.uuid4()}"

    def send(_: int) -> str:
        with stack.client() as http:
            resp = http.post(
                "/v1/images/generations",
                headers={"Idempotency-Key": key, "Prefer": "respond-async"},
                json={"model": "procedural", "prompt": "twins", "size": "64x64"},
            )
        assert resp.status_code == 202, resp.text
        job_id: str = resp.json()["id"]
        return job_id

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(send, range(8)))
    assert len(ids) == 1


def test_usage_details_pass_through_to_the_openai_package(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="gpt-image-1", prompt="usage details", size="1024x1024", n=1
    )
    assert result.usage is not None
    assert result.usage.input_tokens == 10
    assert result.usage.input_tokens_details.text_tokens == 10
    details = result.usage.model_dump()["output_tokens_details"]
    assert details == {"image_tokens": 100, "text_tokens": 0}


def test_stream_with_partial_images_iterates_to_the_completed_image(
    client: openai.OpenAI,
) -> None:
    events = list(
        client.images.generate(
            model="procedural",
            prompt="a streamed lighthouse",
            size="256x256",
            stream=True,
            partial_images=2,
        )
    )
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert [e.partial_image_index for e in partials] == [0, 1]
    pictures = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events]
    assert {p.size for p in pictures} == {(256, 256)}
    # Each partial is a coarser picture of the final one, not another image.
    assert len({p.tobytes() for p in pictures}) == 3
    # 256x256 is outside the size enum of OpenAI's event schema: sent as "auto"
    # (shared/jobs/openai_shape.py); the picture itself is 256x256 (above).
    assert events[-1].size == "auto"


def test_a_streamed_job_that_fails_raises_in_the_openai_package(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError, match="safety system"):
        list(
            client.images.generate(
                model="fake-fast", prompt="[content-policy] streamed", size="64x64", stream=True
            )
        )


def test_the_obiguard_sdks_placeholder_bearer_beside_its_key_header_works(stack: Stack) -> None:
    # What the obiguard SDK's vendored OpenAI client sends: a placeholder key as
    # Bearer, the real key in its own header.
    with openai.OpenAI(
        api_key="OPENAI_API_KEY",
        base_url=f"{stack.base_url}/v1",
        default_headers={"x-obiguard-api-key": stack.key_a},
        max_retries=0,
    ) as gateway:
        result = gateway.images.generate(model="procedural", prompt="via a gateway", size="64x64")
    assert result.data is not None
    assert result.data[0].url


def test_an_upstreams_own_partial_images_are_relayed(client: openai.OpenAI, stack: Stack) -> None:
    events = list(
        client.images.generate(
            model="gpt-image-1",
            prompt="relayed partials",
            size="64x64",
            stream=True,
            partial_images=2,
        )
    )
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    sent = [c for c in stack.upstream.calls if c["body"].get("prompt") == "relayed partials"]
    assert sent[-1]["body"]["stream"] is True
    assert sent[-1]["body"]["partial_images"] == 2
    final = events[-1]
    assert final.type == "image_generation.completed"
    assert Image.open(io.BytesIO(base64.b64decode(final.b64_json))).size == (64, 64)
    assert final.usage.input_tokens == 10
