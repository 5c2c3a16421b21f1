"""``provider: stability`` through the ``openai`` package: the in-process service
calling a fake Stability API (tests/support/fakes/stability.py) over HTTP."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import openai
import pytest
from PIL import Image

from shared.providers.stability import StabilityProvider
from tests.service.conftest import Service
from tests.support.fakes.stability import EXPECTED_KEY, FakeStability
from tests.support.models_file import models_added


@pytest.fixture(scope="module")
def stability(
    service: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FakeStability]:
    fake = FakeStability().start()
    fake.retry_after = "0.2"  # Stability sends none; its 60 s time-out is too long here
    entry = {
        "name": "stable-image-core",
        "provider": "stability",
        "base_url": fake.base_url,
        "api_key_env": "STABILITY_TEST_KEY",
        "upstream_model": "core",
        # One image a call (the worker fans out); sizes whose ratio Stability has.
        "capabilities": {
            "sizes": ["96x96", "160x90", "90x160"],
            "max_n": 4,
            "upstream_max_n": 1,
            "seed": True,
            "edits": True,
        },
    }
    with models_added(
        tmp_path_factory.mktemp("stability"), [entry], {"STABILITY_TEST_KEY": EXPECTED_KEY}
    ):
        yield fake
    StabilityProvider.shared().client.close()  # the process's client, made on first use
    fake.stop()


def images(answer: openai.types.ImagesResponse) -> list[openai.types.Image]:
    assert answer.data is not None
    return answer.data


@pytest.fixture
def api(service: Service, stability: FakeStability) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=service.key_a,
        base_url="http://service.test/v1",
        http_client=service.client(),
        max_retries=0,
    ) as client:
        yield client


def test_n_images_one_call_each_with_seeds_in_the_size_asked(
    api: openai.OpenAI, stability: FakeStability
) -> None:
    got = api.images.generate(
        model="stable-image-core",
        prompt="three foxes",
        n=3,
        size="160x90",
        response_format="b64_json",
        extra_body={"seed": 41},
    )
    assert len(images(got)) == 3
    for image in images(got):
        assert image.b64_json is not None
        picture = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
        # Drawn 128x72 for 16:9, resized to the size asked.
        assert (picture.format, picture.size) == ("PNG", (160, 90))
    calls = stability.calls_for("three foxes")
    assert sorted(c["body"]["seed"] for c in calls) == ["41", "42", "43"]
    assert {(c["path"], c["body"]["aspect_ratio"], c["accept"]) for c in calls} == {
        ("/v2beta/stable-image/generate/core", "16:9", "application/json")
    }


def test_url_answers_are_our_storage(api: openai.OpenAI) -> None:
    got = api.images.generate(model="stable-image-core", prompt="a fox by url", size="96x96")
    (image,) = images(got)
    assert image.url is not None
    assert image.url.startswith("http://service.test/")


def test_an_edit_is_an_inpaint(api: openai.OpenAI, stability: FakeStability) -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (96, 96), (10, 20, 30, 255)).save(buf, "PNG")
    mask = io.BytesIO()
    Image.new("RGBA", (96, 96), (0, 0, 0, 0)).save(mask, "PNG")  # all transparent: edit all
    got = api.images.edit(
        model="stable-image-core",
        image=("in.png", buf.getvalue(), "image/png"),
        mask=("mask.png", mask.getvalue(), "image/png"),
        prompt="inpaint a hat",
        size="96x96",
    )
    assert len(images(got)) == 1
    (call,) = stability.calls_for("inpaint a hat")
    assert call["path"] == "/v2beta/stable-image/edit/inpaint"
    sent = Image.open(io.BytesIO(call["body"]["_bytes"]["mask"][0]))
    assert sent.getextrema() == (255, 255)  # white: inpaint everywhere


@pytest.mark.parametrize("marker", ["[moderation]", "[filtered]"])
def test_moderation_is_our_content_policy_violation(
    api: openai.OpenAI, stability: FakeStability, marker: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(model="stable-image-core", prompt=f"refused {marker}", size="96x96")
    assert caught.value.code == "content_policy_violation"
    assert len(stability.calls_for(f"refused {marker}")) == 1  # never retried


def test_a_429_is_retried(api: openai.OpenAI, stability: FakeStability) -> None:
    got = api.images.generate(model="stable-image-core", prompt="busy [429-once]", size="96x96")
    assert len(images(got)) == 1
    assert len(stability.calls_for("busy [429-once]")) == 2
