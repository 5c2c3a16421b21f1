"""``provider: azure_openai`` through the ``openai`` package: the in-process service
calling a fake Azure OpenAI resource (tests/support/fakes/azure_openai.py) over HTTP."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from PIL import Image

from shared.providers.azure_openai import AzureOpenAIProvider
from tests.service.conftest import Service
from tests.support.fakes.azure_openai import EXPECTED_KEY, FakeAzureOpenAI
from tests.support.models_file import models_added


def azure_models(base_url: str) -> list[dict[str, Any]]:
    upstream = {
        "provider": "azure_openai",
        "base_url": base_url,
        "api_key_env": "AZURE_TEST_KEY",
        "api_version": "2025-04-01-preview",
    }
    return [
        {
            "name": "azure-dall-e-3",
            "upstream_model": "dalle3",
            "upstream_response_format": "url",
            **upstream,
            # dall-e-3 makes one image a call: the worker fans out.
            "capabilities": {"sizes": ["1024x1024"], "max_n": 4, "upstream_max_n": 1},
        },
        {
            "name": "azure-gpt-image-1",
            "upstream_model": "gpt-image",
            "upstream_response_format": None,
            **upstream,
            "capabilities": {"sizes": ["1024x1024"], "max_n": 4, "edits": True},
        },
    ]


@pytest.fixture(scope="module")
def azure(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeAzureOpenAI]:
    fake = FakeAzureOpenAI().start()
    entries = azure_models(fake.base_url)
    with models_added(tmp_path_factory.mktemp("azure"), entries, {"AZURE_TEST_KEY": EXPECTED_KEY}):
        yield fake
    # The process's Azure client (made on the first call) keeps its connections.
    AzureOpenAIProvider.shared().client.close()
    fake.stop()


def images(answer: openai.types.ImagesResponse) -> list[openai.types.Image]:
    assert answer.data is not None
    return answer.data


@pytest.fixture
def api(service: Service, azure: FakeAzureOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=service.key_a,
        base_url="http://service.test/v1",
        http_client=service.client(),
        max_retries=0,
    ) as client:
        yield client


def _size(b64: str | None) -> tuple[int, int]:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_n_images_from_a_one_a_call_deployment_by_url_and_b64(
    api: openai.OpenAI, azure: FakeAzureOpenAI
) -> None:
    got = api.images.generate(model="azure-dall-e-3", prompt="two lighthouses", n=2)
    assert len(images(got)) == 2
    for image in images(got):
        assert image.url is not None
        assert image.url.startswith("http://service.test/")
        assert image.revised_prompt == "revised: two lighthouses"
    calls = azure.calls_for("two lighthouses")
    assert len(calls) == 2  # fanned out, n=1 each, api-key header, api-version
    assert {(c["body"]["n"], c["api_key"], c["api_version"]) for c in calls} == {
        (1, EXPECTED_KEY, "2025-04-01-preview")
    }
    assert {c["path"] for c in calls} == {"/openai/deployments/dalle3/images/generations"}

    inline = api.images.generate(
        model="azure-dall-e-3", prompt="one lighthouse", response_format="b64_json"
    )
    assert _size(images(inline)[0].b64_json) == (1024, 1024)


def test_a_gpt_image_deployment_answers_n_in_one_call(
    api: openai.OpenAI, azure: FakeAzureOpenAI
) -> None:
    got = api.images.generate(
        model="azure-gpt-image-1", prompt="three kites", n=3, response_format="b64_json"
    )
    assert [_size(image.b64_json) for image in images(got)] == [(1024, 1024)] * 3
    (call,) = azure.calls_for("three kites")
    assert call["body"]["n"] == 3
    assert "response_format" not in call["body"]


def test_an_edit_goes_to_the_deployments_edits(api: openai.OpenAI, azure: FakeAzureOpenAI) -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (10, 20, 30, 255)).save(buf, "PNG")
    got = api.images.edit(
        model="azure-gpt-image-1",
        image=("in.png", buf.getvalue(), "image/png"),
        prompt="paint it red",
        response_format="b64_json",
    )
    assert len(images(got)) == 1
    (call,) = azure.calls_for("paint it red")
    assert call["path"] == "/openai/deployments/gpt-image/images/edits"
    assert call["body"]["_files"] == {"image": 1}


@pytest.mark.parametrize("marker", ["[content-filter]", "[output-filter]"])
def test_a_content_filter_refusal_is_our_content_policy_violation(
    api: openai.OpenAI, azure: FakeAzureOpenAI, marker: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(model="azure-dall-e-3", prompt=f"refused {marker}")
    assert caught.value.code == "content_policy_violation"
    assert len(azure.calls_for(f"refused {marker}")) == 1  # never retried


def test_a_429_is_retried_after_its_retry_after(api: openai.OpenAI, azure: FakeAzureOpenAI) -> None:
    got = api.images.generate(model="azure-gpt-image-1", prompt="busy [429-once]")
    assert len(images(got)) == 1
    assert len(azure.calls_for("busy [429-once]")) == 2
