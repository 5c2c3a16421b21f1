"""The stability provider (shared/providers/stability.py): sizes as aspect ratios,
endpoints, the multipart form, answers and errors, against the fake Stability API
(tests/support/fakes/stability.py) over HTTP."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from shared.core.errors import PermanentProviderError, ProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Call, Generation, Inputs
from shared.providers.stability import StabilityProvider, aspect_ratio, stability_mask
from shared.registry import Capabilities, UpstreamModel
from tests.support.fakes.stability import EXPECTED_KEY, FakeStability


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeStability]:
    server = FakeStability().start()
    yield server
    server.stop()


@pytest.fixture
def provider(fake: FakeStability, monkeypatch: pytest.MonkeyPatch) -> Iterator[StabilityProvider]:
    monkeypatch.setenv("STABILITY_UNIT_KEY", EXPECTED_KEY)
    with httpx.Client() as client:
        yield StabilityProvider(client)


def spec(fake: FakeStability, upstream_model: str = "core") -> UpstreamModel:
    return UpstreamModel(
        name="m",
        provider="stability",
        base_url=fake.base_url,
        api_key_env="STABILITY_UNIT_KEY",
        upstream_model=upstream_model,
        capabilities=Capabilities(sizes=["1024x1024"], max_n=4, upstream_max_n=1),
    )


def generate(
    provider: StabilityProvider,
    model: UpstreamModel,
    count: int = 1,
    first: int = 0,
    inputs: Inputs | None = None,
    **params: Any,
) -> Generation:
    fields = {"model": "m", "prompt": "p", "n": count, "size": "1024x1024", **params}
    return provider.generate(Call(model, GenerationParams(**fields), count, first, inputs=inputs))


@pytest.mark.parametrize(
    ("size", "ratio"),
    [
        ("1024x1024", "1:1"),
        ("1280x720", "16:9"),
        ("720x1280", "9:16"),
        ("1344x576", "21:9"),
        ("1152x768", "3:2"),
        ("896x1120", "4:5"),
        ("1792x1024", None),  # 7:4: no such ratio, so not listed in capabilities
        ("auto", None),
    ],
)
def test_sizes_map_to_stabilitys_aspect_ratios(size: str, ratio: str | None) -> None:
    assert aspect_ratio(size) == ratio


def test_the_form_of_each_image(provider: StabilityProvider, fake: FakeStability) -> None:
    got = generate(
        provider,
        spec(fake),
        2,
        first=3,
        prompt="form",
        size="1280x720",
        seed=7,
        output_format="webp",
    )
    assert [Image.open(io.BytesIO(i.data)).size for i in got.images] == [(1280, 720)] * 2
    calls = fake.calls_for("form")
    assert [c["body"]["seed"] for c in calls] == ["10", "11"]  # seed + the image's index
    assert {(c["authorization"], c["accept"]) for c in calls} == {
        (f"Bearer {EXPECTED_KEY}", "application/json")
    }
    assert {(c["body"]["aspect_ratio"], c["body"]["output_format"]) for c in calls} == {
        ("16:9", "webp")
    }


def test_an_sd3_model_is_the_sd3_endpoints_model_field(
    provider: StabilityProvider, fake: FakeStability
) -> None:
    generate(provider, spec(fake, "sd3.5-medium"), prompt="sd3", output_format="webp")
    (call,) = fake.calls_for("sd3")
    assert call["path"] == "/v2beta/stable-image/generate/sd3"
    assert (call["body"]["model"], call["body"]["output_format"]) == ("sd3.5-medium", "png")
    with pytest.raises(PermanentProviderError) as caught:
        generate(provider, spec(fake, "sdxl"))
    assert caught.value.code == "provider_misconfigured"


def test_an_edit_inpaints_with_the_mask_turned_white_where_transparent(
    provider: StabilityProvider, fake: FakeStability
) -> None:
    image, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(image, "PNG")
    ours = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    ours.paste((0, 0, 0, 0), (0, 0, 32, 64))  # the left half transparent: edit there
    ours.save(mask, "PNG")
    converted = Image.open(io.BytesIO(stability_mask(mask.getvalue())))
    assert (converted.getpixel((0, 0)), converted.getpixel((63, 0))) == (255, 0)
    generate(
        provider,
        spec(fake),
        prompt="inpaint",
        size="64x64",
        operation="edit",
        inputs=Inputs([image.getvalue()], mask.getvalue()),
    )
    (call,) = fake.calls_for("inpaint")
    assert call["path"] == "/v2beta/stable-image/edit/inpaint"
    assert call["body"]["_files"] == {"image": 1, "mask": 1}
    with pytest.raises(PermanentProviderError):  # one image only; no variations
        generate(provider, spec(fake), operation="edit", inputs=Inputs([image.getvalue()] * 2))
    with pytest.raises(PermanentProviderError):
        generate(provider, spec(fake), operation="variation", inputs=Inputs([image.getvalue()]))


@pytest.mark.parametrize(
    ("marker", "kind", "code"),
    [
        ("[moderation]", PermanentProviderError, "content_policy_violation"),
        ("[filtered]", PermanentProviderError, "content_policy_violation"),
        ("[422]", PermanentProviderError, "upstream_rejected"),
        ("[500-once]", TransientProviderError, "upstream_unavailable"),
        ("[429-once]", TransientProviderError, "upstream_rate_limited"),
    ],
)
def test_answers_as_errors(
    provider: StabilityProvider,
    fake: FakeStability,
    marker: str,
    kind: type[ProviderError],
    code: str,
) -> None:
    with pytest.raises(kind) as caught:
        generate(provider, spec(fake), prompt=f"errors {marker}")
    assert caught.value.code == code
    if marker == "[429-once]":  # no Retry-After: the 60 s time-out Stability documents
        assert caught.value.retry_after == 60.0


def test_a_bad_key_is_an_auth_error(
    provider: StabilityProvider, fake: FakeStability, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STABILITY_UNIT_KEY", "wrong")
    with pytest.raises(PermanentProviderError) as caught:
        generate(provider, spec(fake))
    assert caught.value.code == "upstream_auth_error"
