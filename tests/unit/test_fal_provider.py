"""The fal provider (shared/providers/fal.py): the request's input and URLs built from
the entry, errors read, and the queue path (submit, status looked at until
COMPLETED, result) and cancel against the fake fal queue (tests/support/fakes/fal.py)
over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.core.errors import PermanentProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Call, Generation, Pending
from shared.providers.fal import FalProvider, _refused, fal_input, request_root
from shared.providers.openai_compat import OpenAICompatibleProvider
from shared.providers.queued import Answer
from shared.registry import UpstreamModel
from shared.registry.entries import Capabilities
from tests.support.fakes.fal import EXPECTED_KEY, FakeFal

DEV = "fal-ai/flux/dev"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeFal]:
    server = FakeFal(polls=4).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def provider(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> FalProvider:
    monkeypatch.setenv("FAL_TEST_KEY", EXPECTED_KEY)
    return FalProvider(OpenAICompatibleProvider(client))


def spec(base_url: str, app: str = DEV) -> UpstreamModel:
    return UpstreamModel(
        name="flux-dev",
        provider="fal",
        base_url=base_url,
        api_key_env="FAL_TEST_KEY",
        upstream_model=app,
        poll_seconds=0.01,
        capabilities=Capabilities(sizes=["64x64"], max_n=4),
    )


def params(**fields: Any) -> GenerationParams:
    fields = {"model": "flux-dev", "prompt": "a heron", "n": 1, "size": "64x64", **fields}
    return GenerationParams(**fields)


def until_done(provider: FalProvider, call: Call, ref: dict[str, Any]) -> list[str]:
    """Poll until done: the statuses seen while pending."""
    seen: list[str] = []
    while isinstance(answer := provider.poll(call, ref), Pending):
        seen.append(answer.status)
        assert len(seen) < 20
    return seen


def test_the_input_carries_size_images_seed_format_and_the_safety_checker() -> None:
    assert fal_input(params(size="1344x768", seed=9, output_format="webp"), 2, 3) == {
        "prompt": "a heron",
        "num_images": 2,
        "image_size": {"width": 1344, "height": 768},
        "seed": 12,  # the job's seed plus the call's first image
        "output_format": "png",  # fal's FLUX takes jpeg or png; the worker encodes webp
        "enable_safety_checker": True,
    }


def test_requests_are_looked_at_under_the_app_without_its_subpath() -> None:
    assert request_root("fal-ai/flux/dev") == "fal-ai/flux"
    assert request_root("fal-ai/fast-sdxl") == "fal-ai/fast-sdxl"
    assert request_root("workflows/acme/pipeline/run") == "workflows/acme/pipeline"


def test_fal_errors_are_read_by_their_shape_and_retry_header() -> None:
    def answer(status: int, body: Any, **headers: str) -> Answer:
        content = httpx.Response(200, json=body).content
        return Answer(httpx.Response(status, headers=headers, content=content), content)

    flagged = [{"loc": ["body", "prompt"], "msg": "Flagged.", "type": "content_policy_violation"}]
    refusal = _refused(answer(422, {"detail": flagged}))
    assert (refusal.code, refusal.message) == ("content_policy_violation", "fal: prompt: Flagged.")
    invalid = [{"loc": ["body", "num_images"], "msg": "too many", "type": "less_than_equal"}]
    assert _refused(answer(422, {"detail": invalid})).code == "upstream_rejected"
    throttled = _refused(answer(429, {"detail": "slow down"}, **{"Retry-After": "3"}))
    assert (throttled.code, throttled.retry_after) == ("upstream_rate_limited", 3.0)
    final = _refused(answer(500, {"detail": "bad input"}, **{"X-Fal-Retryable": "false"}))
    assert isinstance(final, PermanentProviderError)
    again = _refused(answer(400, {"detail": "try again"}, **{"X-Fal-Retryable": "true"}))
    assert isinstance(again, TransientProviderError)
    assert _refused(answer(401, {"detail": "No user found"})).code == "upstream_auth_error"


def test_a_request_is_queued_once_and_looked_at_until_it_has_images(
    fake: FakeFal, provider: FalProvider
) -> None:
    call = Call(spec(fake.base_url), params(prompt="a heron at dawn", n=3, seed=5), 3)
    before = fake.submits
    ref = provider.submit(call)
    assert ref["status_url"].endswith(f"/fal-ai/flux/requests/{ref['request_id']}/status")
    assert until_done(provider, call, ref) == [
        "IN_QUEUE (position 1)",
        "IN_PROGRESS",
        "IN_PROGRESS",
    ]
    done = provider.poll(call, ref)  # a completed request answers again, the same
    assert isinstance(done, Generation)
    assert len(done.images) == 3
    assert all(image.data.startswith(b"\x89PNG") for image in done.images)
    assert fake.submits == before + 1
    assert fake.submitted[-1] == {
        "app": DEV,
        "body": {
            "prompt": "a heron at dawn",
            "num_images": 3,
            "image_size": {"width": 64, "height": 64},
            "seed": 5,
            "output_format": "png",
            "enable_safety_checker": True,
        },
    }


@pytest.mark.parametrize("marker", ["[policy]", "[nsfw]"])
def test_a_flagged_prompt_or_image_is_a_content_policy_refusal(
    fake: FakeFal, provider: FalProvider, marker: str
) -> None:
    call = Call(spec(fake.base_url), params(prompt=f"a heron {marker}"), 1)
    ref = provider.submit(call)
    with pytest.raises(PermanentProviderError) as caught:
        until_done(provider, call, ref)
    assert caught.value.code == "content_policy_violation"


def test_a_failed_request_is_transient_so_it_is_submitted_anew(
    fake: FakeFal, provider: FalProvider
) -> None:
    call = Call(spec(fake.base_url), params(prompt="a heron [fail]"), 1)
    ref = provider.submit(call)
    with pytest.raises(TransientProviderError) as caught:
        until_done(provider, call, ref)
    assert "runner_server_error" in caught.value.message


def test_a_throttled_submit_is_transient_with_its_retry_after(
    fake: FakeFal, provider: FalProvider
) -> None:
    call = Call(spec(fake.base_url), params(prompt="a heron [429-once]"), 1)
    before = fake.submits
    with pytest.raises(TransientProviderError) as caught:
        provider.submit(call)
    assert (caught.value.code, caught.value.retry_after) == ("upstream_rate_limited", 1.0)
    provider.submit(call)
    assert fake.submits == before + 1


def test_invalid_input_and_a_wrong_key_are_permanent(
    fake: FakeFal, provider: FalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        provider.submit(Call(spec(fake.base_url), params(n=5), 5))  # num_images past 4
    assert caught.value.code == "upstream_rejected"
    assert "num_images" in caught.value.message
    monkeypatch.setenv("FAL_TEST_KEY", "wrong")
    with pytest.raises(PermanentProviderError) as caught:
        provider.submit(Call(spec(fake.base_url), params(), 1))
    assert caught.value.code == "upstream_auth_error"


def test_cancel_reaches_fal_and_the_request_ends_canceled(
    fake: FakeFal, provider: FalProvider
) -> None:
    upstream = spec(fake.base_url)
    call = Call(upstream, params(prompt="a heron to cancel"), 1)
    ref = provider.submit(call)
    provider.cancel(upstream, ref)
    assert ref["request_id"] in fake.canceled
    with pytest.raises(PermanentProviderError, match="client_cancelled"):
        until_done(provider, call, ref)


def test_urls_off_base_urls_origin_are_not_followed(fake: FakeFal, provider: FalProvider) -> None:
    call = Call(spec(fake.base_url), params(prompt="a heron, kept home"), 1)
    ref = provider.submit(call)
    ref.update(status_url="http://elsewhere.test/s", response_url="http://elsewhere.test/r")
    until_done(provider, call, ref)  # built from the app id instead: our key stays home


def test_a_look_that_does_not_reach_fal_is_pending_not_a_failure(provider: FalProvider) -> None:
    answer = provider.poll(Call(spec("http://127.0.0.1:9"), params(), 1), {"request_id": "r-1"})
    assert isinstance(answer, Pending)


def test_generate_submits_and_waits_in_place(fake: FakeFal, provider: FalProvider) -> None:
    before = fake.submits
    generation = provider.generate(Call(spec(fake.base_url), params(prompt="a heron, now"), 2))
    assert len(generation.images) == 2
    assert fake.submits == before + 1
