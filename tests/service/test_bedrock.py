"""Bedrock models (provider: bedrock) through the `openai` package, in-process, their
upstream the fake Bedrock runtime (tests/support/fakes/bedrock.py) reached by boto3
with the fake's credentials: Nova Canvas answering several images a call, a
Stability model one a call (the worker fans out), both response formats from our
storage, content filters as our 400, a throttled call retried."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from PIL import Image

from shared.core.settings import get_settings
from shared.registry import get_registry
from tests.service.conftest import Service
from tests.support.fakes.bedrock import ACCESS_KEY, REGION, SECRET_KEY, FakeBedrock
from tests.support.stack import models_yaml


def _entries(base_url: str) -> list[dict[str, Any]]:
    bedrock = {"provider": "bedrock", "region": REGION, "base_url": base_url}
    return [
        {
            "name": "nova-canvas",
            "upstream_model": "amazon.nova-canvas-v1:0",
            **bedrock,
            "capabilities": {
                "sizes": ["320x320", "1024x1024"],
                "max_n": 5,
                "upstream_max_n": 5,
                "qualities": ["standard", "premium"],
                "seed": True,
                "edits": True,
            },
        },
        {
            "name": "sd-core",
            "upstream_model": "stability.stable-image-core-v1:1",
            **bedrock,
            "capabilities": {"sizes": ["1024x1024", "1344x768"], "max_n": 4, "upstream_max_n": 1},
        },
    ]


@pytest.fixture(scope="module")
def fake(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeBedrock]:
    """The fake Bedrock, the registry with its models besides the usual ones, the
    fake's AWS credentials, and retries spaced closely; all undone after."""
    server = FakeBedrock().start()
    models = models_yaml("http://127.0.0.1:9/v1")
    models["models"] += _entries(server.base_url)
    path = Path(tmp_path_factory.mktemp("bedrock")) / "models.yaml"
    path.write_text(yaml.safe_dump(models))
    patch = pytest.MonkeyPatch()
    patch.setenv("IMAGEGEN_MODELS_FILE", str(path))
    patch.setenv("IMAGEGEN_PROVIDER_BACKOFF_SECONDS", "0.05")
    patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_BEARER_TOKEN_BEDROCK"):
        patch.delenv(name, raising=False)
    get_registry.cache_clear()
    get_settings.cache_clear()
    yield server
    patch.undo()
    get_registry.cache_clear()
    get_settings.cache_clear()
    server.stop()


@pytest.fixture
def api(service: Service, fake: FakeBedrock) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=service.key_a,
        base_url="http://service.test/v1",
        http_client=service.client(),
        max_retries=0,
    ) as client:
        yield client


def _size(b64: str | None) -> tuple[int, int]:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_nova_answers_n_images_in_one_signed_call(api: openai.OpenAI, fake: FakeBedrock) -> None:
    result = api.images.generate(
        model="nova-canvas",
        prompt="a lighthouse at dusk",
        n=3,
        size="320x320",
        response_format="b64_json",
        extra_body={"seed": 1234, "quality": "premium"},  # the model's own quality
    )
    assert result.data is not None
    assert [_size(item.b64_json) for item in result.data] == [(320, 320)] * 3
    (call,) = fake.calls_for("a lighthouse at dusk")
    assert call["body"] == {
        "taskType": "TEXT_IMAGE",
        "textToImageParams": {"text": "a lighthouse at dusk"},
        "imageGenerationConfig": {
            "numberOfImages": 3,
            "width": 320,
            "height": 320,
            "seed": 1234,
            "quality": "premium",
        },
    }
    assert call["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")


def test_url_answers_are_our_own_urls(
    api: openai.OpenAI, service: Service, fake: FakeBedrock
) -> None:
    result = api.images.generate(
        model="nova-canvas", prompt="a harbour", n=2, size="320x320", response_format="url"
    )
    assert result.data is not None
    assert len(result.data) == 2
    for item in result.data:
        assert item.url
        assert item.url.startswith("http://service.test/v1/images/files/")
        got = service.client().get(item.url)
        assert got.status_code == 200
        assert Image.open(io.BytesIO(got.content)).size == (320, 320)


def test_a_stability_model_fans_out_one_image_a_call(api: openai.OpenAI, fake: FakeBedrock) -> None:
    result = api.images.generate(
        model="sd-core", prompt="a dune", n=2, size="1344x768", response_format="b64_json"
    )
    assert result.data is not None
    assert [_size(item.b64_json) for item in result.data] == [(1344, 768)] * 2
    calls = fake.calls_for("a dune")
    assert len(calls) == 2
    assert all(c["body"]["aspect_ratio"] == "16:9" for c in calls)
    assert all(set(c["body"]) == {"prompt", "aspect_ratio", "seed", "output_format"} for c in calls)


@pytest.mark.parametrize(
    ("model", "prompt"),
    [
        ("nova-canvas", "a riot [content-filter]"),
        ("nova-canvas", "a riot [output-filter]"),
        ("sd-core", "a riot [content-filter]"),
    ],
)
def test_content_filters_answer_our_400_and_are_not_retried(
    api: openai.OpenAI, fake: FakeBedrock, model: str, prompt: str
) -> None:
    prompt = f"{prompt} {model}"
    size = "320x320" if model == "nova-canvas" else "1024x1024"
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(model=model, prompt=prompt, size=size)
    assert caught.value.code == "content_policy_violation"
    assert len(fake.calls_for(prompt)) == 1


def test_a_throttled_call_is_retried(api: openai.OpenAI, fake: FakeBedrock) -> None:
    result = api.images.generate(
        model="nova-canvas",
        prompt="[throttle-once] a gull",
        size="320x320",
        response_format="b64_json",
    )
    assert result.data is not None
    assert len(result.data) == 1
    assert len(fake.calls_for("[throttle-once] a gull")) == 2


def test_an_edit_with_a_mask_is_inpainted(api: openai.OpenAI, fake: FakeBedrock) -> None:
    def png(mode: str, colour: Any) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (320, 320), colour).save(buf, format="PNG")
        return buf.getvalue()

    result = api.images.edit(
        model="nova-canvas",
        image=("in.png", png("RGB", (10, 200, 10)), "image/png"),
        mask=("mask.png", png("RGBA", (0, 0, 0, 0)), "image/png"),
        prompt="a red door",
        response_format="b64_json",
    )
    assert result.data is not None
    assert _size(result.data[0].b64_json) == (320, 320)
    (call,) = fake.calls_for("a red door")
    assert call["body"]["taskType"] == "INPAINTING"
