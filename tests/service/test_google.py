"""The google provider against a fake Gemini API over real HTTP (tests/support/fakes/
google.py): the provider alone (auth, request shapes, answers and faults), then
the whole service through the `openai` package (n images, b64_json and url from our
storage, token usage priced, refusals as our 400 content_policy_violation, a 429
retried)."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from PIL import Image

from shared import registry
from shared.core.errors import PermanentProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Call, Inputs
from shared.providers.google import GoogleProvider
from shared.registry import UpstreamModel
from tests.service.conftest import Service
from tests.support.fakes.google import EXPECTED_KEY, FakeGoogle

KEY_ENV = "IMAGEGEN_TEST_GOOGLE_KEY"
PRICE_IN, PRICE_OUT = 0.3e-6, 30e-6  # gemini-2.5-flash-image, USD a token


def entries(base_url: str) -> list[dict[str, Any]]:
    connection = {"provider": "google", "base_url": base_url, "api_key_env": KEY_ENV}
    return [
        {
            "name": "gemini-image",
            "upstream_model": "gemini-2.5-flash-image",
            **connection,
            "capabilities": {
                "sizes": ["1024x1024", "1344x768", "768x1344"],
                "max_n": 4,
                "upstream_max_n": 1,
                "seed": True,
                "edits": True,
            },
            "price": {"per_token": {"input": PRICE_IN, "output": PRICE_OUT}},
        },
        {
            "name": "imagen",
            "upstream_model": "imagen-4.0-generate-001",
            **connection,
            "capabilities": {
                "sizes": ["1024x1024", "1408x768", "768x1408", "2048x2048"],
                "max_n": 4,
            },
            "price": {"per_image": 0.04},
        },
    ]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGoogle]:
    fake = FakeGoogle().start()
    fake.retry_delay = "0.2s"
    os.environ[KEY_ENV] = EXPECTED_KEY
    yield fake
    os.environ.pop(KEY_ENV, None)
    fake.stop()


@pytest.fixture(scope="module")
def google_models(service: Service, fake: FakeGoogle) -> Iterator[None]:
    """The service's models file with the google entries added, for this module."""
    path = Path(os.environ["IMAGEGEN_MODELS_FILE"])
    before = path.read_text()
    models = yaml.safe_load(before)
    models["models"] += entries(fake.base_url)
    path.write_text(yaml.safe_dump(models))
    registry.get_registry.cache_clear()
    yield
    path.write_text(before)
    registry.get_registry.cache_clear()


@pytest.fixture
def api(service: Service, google_models: None) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=service.key_a,
        base_url="http://service.test/v1",
        http_client=service.client(),
        max_retries=0,
    ) as client:
        yield client


def call(
    fake: FakeGoogle,
    name: str,
    count: int = 1,
    first: int = 0,
    inputs: Inputs | None = None,
    **kw: Any,
) -> Call:
    spec = next(
        UpstreamModel.model_validate(e) for e in entries(fake.base_url) if e["name"] == name
    )
    params = {"model": name, "prompt": "a lighthouse", "n": count, "size": "1024x1024", **kw}
    return Call(spec, GenerationParams.model_validate(params), count, first, inputs=inputs)


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# --- the provider against the fake ---------------------------------------------------


@pytest.fixture(scope="module")
def provider() -> Iterator[GoogleProvider]:
    with httpx.Client(timeout=10) as client:
        yield GoogleProvider(client)


def test_a_wrong_or_missing_key_is_an_auth_error(
    fake: FakeGoogle, provider: GoogleProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(PermanentProviderError) as caught:  # Google's 400 API_KEY_INVALID
        provider.generate(call(fake, "gemini-image", prompt="wrong key"))
    assert caught.value.code == "upstream_auth_error"
    assert "API key not valid" in caught.value.message
    assert fake.keys[-1] == "wrong"
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(PermanentProviderError) as caught:  # 403 PERMISSION_DENIED
        provider.generate(call(fake, "imagen", prompt="no key"))
    assert caught.value.code == "upstream_auth_error"
    assert fake.keys[-1] is None  # no header at all, not an empty one


def test_a_gemini_call_answers_the_image_of_its_ratio_not_its_thoughts(
    fake: FakeGoogle, provider: GoogleProvider
) -> None:
    generation = provider.generate(
        call(fake, "gemini-image", first=1, size="768x1344", seed=41, prompt="tall [thoughts]")
    )
    assert len(generation.images) == 1
    assert size_of(generation.images[0].data) == (36, 64)  # the fake's 9:16
    (sent,) = fake.calls_for("tall [thoughts]")
    assert sent["model"] == "gemini-2.5-flash-image"
    config = sent["body"]["generationConfig"]
    assert config["imageConfig"] == {"aspectRatio": "9:16"}
    assert config["seed"] == 42
    assert generation.usage is not None
    assert generation.usage["output_tokens"] == 1290 + 8  # the thought image not counted


def test_an_imagen_call_asks_for_n_samples_at_2k(
    fake: FakeGoogle, provider: GoogleProvider
) -> None:
    generation = provider.generate(
        call(fake, "imagen", count=3, size="2048x2048", prompt="three at 2K")
    )
    assert [size_of(image.data) for image in generation.images] == [(96, 96)] * 3
    (sent,) = fake.calls_for("three at 2K")
    assert sent["method"] == "predict"
    assert sent["body"]["parameters"] == {
        "sampleCount": 3,
        "includeRaiReason": True,
        "aspectRatio": "1:1",
        "sampleImageSize": "2K",
    }


def test_a_503_is_transient_and_a_text_only_answer_is_tried_again(
    fake: FakeGoogle, provider: GoogleProvider
) -> None:
    with pytest.raises(TransientProviderError) as caught:
        provider.generate(call(fake, "gemini-image", prompt="[503-once] busy"))
    assert caught.value.code == "upstream_unavailable"
    with pytest.raises(TransientProviderError) as caught:
        provider.generate(call(fake, "gemini-image", prompt="[text-only] words"))
    assert caught.value.code == "upstream_bad_response"
    assert "Here is the picture" in caught.value.message


def test_a_gemini_call_for_several_images_is_a_misconfigured_entry(
    fake: FakeGoogle, provider: GoogleProvider
) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        provider.generate(call(fake, "gemini-image", count=2, prompt="two at once"))
    assert caught.value.code == "provider_misconfigured"
    assert "upstream_max_n: 1" in caught.value.message
    assert not fake.calls_for("two at once")


def test_a_gemini_edit_sends_the_images_inline(fake: FakeGoogle, provider: GoogleProvider) -> None:
    picture = png((20, 30))
    generation = provider.generate(
        call(
            fake, "gemini-image", operation="edit", prompt="make it blue", inputs=Inputs([picture])
        )
    )
    assert len(generation.images) == 1
    (sent,) = fake.calls_for("make it blue")
    parts = sent["body"]["contents"][0]["parts"]
    assert parts[1]["inlineData"] == {
        "mimeType": "image/png",
        "data": base64.b64encode(picture).decode(),
    }
    assert generation.usage is not None
    assert generation.usage["input_tokens_details"]["image_tokens"] == 258


# --- the service through the openai package -------------------------------------------


def test_gemini_n_images_come_from_one_call_each_seeded_and_priced_by_tokens(
    api: openai.OpenAI, fake: FakeGoogle
) -> None:
    raw = api.images.with_raw_response.generate(
        model="gemini-image",
        prompt="a lighthouse at dusk",
        n=2,
        size="1344x768",
        response_format="b64_json",
        extra_body={"seed": 7},
    )
    result = raw.parse()
    assert result.data is not None
    assert len(result.data) == 2
    for item in result.data:
        assert item.b64_json
        assert size_of(base64.b64decode(item.b64_json)) == (64, 36)  # the fake's 16:9
    calls = fake.calls_for("a lighthouse at dusk")
    assert sorted(c["body"]["generationConfig"]["seed"] for c in calls) == [7, 8]
    assert {c["body"]["generationConfig"]["imageConfig"]["aspectRatio"] for c in calls} == {"16:9"}
    # Each call: 5 prompt tokens in, an image and 8 text tokens out.
    expected = 2 * (5 * PRICE_IN + (1290 + 8) * PRICE_OUT)
    assert float(raw.headers["x-imagegen-cost-usd"]) == pytest.approx(expected, abs=2e-6)


def test_imagen_n_images_by_url_are_ours_from_one_call(
    api: openai.OpenAI, fake: FakeGoogle, service: Service
) -> None:
    result = api.images.generate(
        model="imagen", prompt="three red boats", n=3, size="1408x768", response_format="url"
    )
    assert result.data is not None
    assert len(result.data) == 3
    client = service.client()
    for item in result.data:
        assert item.url
        assert item.url.startswith("http://service.test/")
        assert size_of(client.get(item.url).content) == (64, 36)
    (sent,) = fake.calls_for("three red boats")
    assert sent["body"]["parameters"]["sampleCount"] == 3
    assert sent["body"]["parameters"]["aspectRatio"] == "16:9"


@pytest.mark.parametrize(
    ("model", "prompt", "n"),
    [
        ("gemini-image", "a filtered picture [image-safety]", 1),
        ("gemini-image", "a blocked prompt [blocked]", 1),
        ("imagen", "a blocked imagen prompt [blocked]", 1),
        ("imagen", "one of two filtered [filter-one]", 2),
    ],
)
def test_google_refusals_are_our_400_content_policy_violation_not_retried(
    api: openai.OpenAI, fake: FakeGoogle, model: str, prompt: str, n: int
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(model=model, prompt=prompt, n=n, response_format="b64_json")
    assert caught.value.code == "content_policy_violation"
    assert len(fake.calls_for(prompt)) == 1


def test_a_429_with_a_retry_delay_is_retried(api: openai.OpenAI, fake: FakeGoogle) -> None:
    result = api.images.generate(
        model="imagen", prompt="[429-once] a quota", n=1, response_format="b64_json"
    )
    assert len(result.data or []) == 1
    assert len(fake.calls_for("[429-once] a quota")) == 2


def test_an_edit_through_gemini(api: openai.OpenAI, fake: FakeGoogle) -> None:
    result = api.images.edit(
        model="gemini-image",
        image=("in.png", png((32, 32)), "image/png"),
        prompt="paint the sky orange",
        response_format="b64_json",
    )
    assert len(result.data or []) == 1
    (sent,) = fake.calls_for("paint the sky orange")
    assert [list(part) for part in sent["body"]["contents"][0]["parts"]] == [
        ["text"],
        ["inlineData"],
    ]
