"""The replicate provider (shared/providers/replicate.py): the prediction's input and
path built from the entry, answers and problem details read, and the queue path
(submit, poll pending several times, done) and cancel against the fake Replicate API
(tests/support/fakes/replicate.py) over HTTP."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.core.errors import PermanentProviderError, TransientProviderError
from shared.core.settings import get_settings
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Call, Generation, Pending
from shared.providers.openai_compat import OpenAICompatibleProvider
from shared.providers.queued import Answer
from shared.providers.replicate import (
    ReplicateProvider,
    _refused,
    aspect_ratio,
    output_urls,
    prediction_input,
)
from shared.registry import UpstreamModel
from shared.registry.entries import Capabilities
from tests.support.fakes.replicate import EXPECTED_TOKEN, FakeReplicate

SCHNELL = "black-forest-labs/flux-schnell"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeReplicate]:
    server = FakeReplicate(polls=4).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def provider(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> ReplicateProvider:
    monkeypatch.setenv("REPLICATE_TEST_TOKEN", EXPECTED_TOKEN)
    return ReplicateProvider(OpenAICompatibleProvider(client))


def spec(base_url: str, model: str = SCHNELL, **fields: Any) -> UpstreamModel:
    return UpstreamModel(
        name="flux",
        provider="replicate",
        base_url=base_url,
        api_key_env="REPLICATE_TEST_TOKEN",
        upstream_model=model,
        poll_seconds=0.01,
        capabilities=Capabilities(sizes=["64x64", "1344x768"], max_n=4),
        **fields,
    )


def params(**fields: Any) -> GenerationParams:
    return GenerationParams(
        **{"model": "flux", "prompt": "a fox", "n": 1, "size": "64x64", **fields}
    )


def until_done(provider: ReplicateProvider, call: Call, ref: dict[str, Any]) -> list[str]:
    """Poll until done: the statuses seen while pending."""
    seen: list[str] = []
    while isinstance(answer := provider.poll(call, ref), Pending):
        seen.append(answer.status)
        assert len(seen) < 20
    return seen


def test_the_input_carries_size_outputs_seed_and_format() -> None:
    body = prediction_input(params(size="1344x768", seed=40, output_format="jpeg"), 3, 2)
    assert body == {
        "prompt": "a fox",
        "aspect_ratio": "16:9",
        "width": 1344,
        "height": 768,
        "num_outputs": 3,
        "seed": 42,  # the job's seed plus the call's first image
        "output_format": "jpg",
    }
    one = prediction_input(params(size="auto"), 1, 0)
    assert one == {"prompt": "a fox", "output_format": "png"}  # no num_outputs for one


def test_an_aspect_ratio_is_the_nearest_replicate_takes_or_none() -> None:
    assert aspect_ratio(1024, 1024) == "1:1"
    assert aspect_ratio(1216, 832) == "3:2"
    assert aspect_ratio(640, 1536) == "9:21"
    assert aspect_ratio(1000, 100) is None


def test_output_is_one_url_or_a_list() -> None:
    assert output_urls("https://replicate.delivery/a.png") == ["https://replicate.delivery/a.png"]
    assert output_urls(["a", "b"]) == ["a", "b"]
    assert output_urls(None) == []


def test_problem_details_are_read_as_errors() -> None:
    def answer(status: int, body: dict[str, Any], **headers: str) -> Answer:
        content = httpx.Response(200, json=body).content
        return Answer(httpx.Response(status, headers=headers, content=content), content)

    throttled = _refused(
        answer(429, {"title": "Request was throttled", "status": 429}, **{"Retry-After": "7"})
    )
    assert isinstance(throttled, TransientProviderError)
    assert (throttled.code, throttled.retry_after) == ("upstream_rate_limited", 7.0)
    credit = _refused(answer(402, {"title": "Insufficient credit", "detail": "Buy more."}))
    assert isinstance(credit, PermanentProviderError)
    assert credit.message == "replicate: Insufficient credit: Buy more."
    assert _refused(answer(401, {"title": "Unauthenticated"})).code == "upstream_auth_error"
    assert _refused(answer(503, {"detail": "busy"})).code == "upstream_unavailable"


def test_a_prediction_is_created_once_and_polled_until_it_has_images(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    call = Call(spec(fake.base_url), params(prompt="a fox in snow", n=2, seed=7), 2)
    before = fake.submits
    ref = provider.submit(call)
    assert until_done(provider, call, ref) == ["processing"] * 3  # done at the 4th look
    done = provider.poll(call, ref)  # a done prediction answers again, the same
    assert isinstance(done, Generation)
    assert len(done.images) == 2
    assert all(image.data.startswith(b"\x89PNG") for image in done.images)
    assert fake.submits == before + 1
    made = fake.creates[-1]
    assert made["model"] == SCHNELL
    assert made["body"]["input"] == {
        "prompt": "a fox in snow",
        "aspect_ratio": "1:1",
        "width": 64,
        "height": 64,
        "num_outputs": 2,
        "seed": 7,
        "output_format": "png",
    }
    assert made["prefer"] == ""  # the queue path holds nothing open


def test_a_version_is_created_on_the_predictions_path(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    call = Call(spec(fake.base_url, "stability-ai/sdxl:39ed52f2a78e"), params(prompt="a pier"), 1)
    ref = provider.submit(call)
    assert fake.creates[-1]["version"] == "39ed52f2a78e"
    until_done(provider, call, ref)


@pytest.mark.parametrize("marker", ["[nsfw]", "[sensitive]"])
def test_a_prediction_failed_as_unsafe_is_a_content_policy_refusal(
    fake: FakeReplicate, provider: ReplicateProvider, marker: str
) -> None:
    call = Call(spec(fake.base_url), params(prompt=f"a fox {marker}"), 1)
    ref = provider.submit(call)
    with pytest.raises(PermanentProviderError) as caught:
        until_done(provider, call, ref)
    assert caught.value.code == "content_policy_violation"


def test_another_failed_prediction_is_permanent_with_the_models_error(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    call = Call(spec(fake.base_url), params(prompt="a fox [fail]"), 1)
    ref = provider.submit(call)
    with pytest.raises(PermanentProviderError) as caught:
        until_done(provider, call, ref)
    assert caught.value.code == "upstream_rejected"
    assert "illegal memory access" in caught.value.message


def test_a_throttled_create_is_transient_with_its_retry_after(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    call = Call(spec(fake.base_url), params(prompt="a fox [429-once]"), 1)
    before = fake.submits
    with pytest.raises(TransientProviderError) as caught:
        provider.submit(call)
    assert (caught.value.code, caught.value.retry_after) == ("upstream_rate_limited", 1.0)
    assert fake.submits == before  # nothing was created
    provider.submit(call)
    assert fake.submits == before + 1


def test_refusals_at_create_are_permanent(fake: FakeReplicate, provider: ReplicateProvider) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        provider.submit(Call(spec(fake.base_url), params(prompt="a fox [402]"), 1))
    assert "Insufficient credit" in caught.value.message
    with pytest.raises(PermanentProviderError) as caught:
        provider.submit(Call(spec(fake.base_url), params(n=5), 5))  # num_outputs past 4
    assert caught.value.code == "upstream_rejected"
    assert "Input validation failed" in caught.value.message


def test_a_wrong_token_is_an_auth_error(
    fake: FakeReplicate, provider: ReplicateProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLICATE_TEST_TOKEN", "r8_wrong")
    with pytest.raises(PermanentProviderError) as caught:
        provider.submit(Call(spec(fake.base_url), params(), 1))
    assert caught.value.code == "upstream_auth_error"


def test_cancel_reaches_replicate_and_the_prediction_ends_canceled(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    upstream = spec(fake.base_url)
    call = Call(upstream, params(prompt="a fox to cancel"), 1)
    ref = provider.submit(call)
    provider.cancel(upstream, ref)
    assert ref["id"] in fake.canceled
    with pytest.raises(PermanentProviderError, match="canceled"):
        until_done(provider, call, ref)


def test_a_look_that_does_not_reach_replicate_is_pending_not_a_failure(
    provider: ReplicateProvider,
) -> None:
    call = Call(spec("http://127.0.0.1:9/v1"), params(), 1)
    answer = provider.poll(call, {"id": "abc123"})
    assert isinstance(answer, Pending)  # failing would drop the record: a second submit
    assert answer.status == "not reached (upstream_unavailable)"


def test_urls_in_the_prediction_are_not_followed(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    call = Call(spec(fake.base_url), params(prompt="a fox, kept home"), 1)
    ref = provider.submit(call)
    ref["urls"] = {"get": "http://elsewhere.test/steal", "cancel": "http://elsewhere.test/c"}
    until_done(provider, call, ref)  # our key went to base_url only


def test_generate_waits_synchronously_then_in_place(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    fake.finish_when_waited = True
    try:
        generation = provider.generate(Call(spec(fake.base_url), params(prompt="a quick fox"), 1))
    finally:
        fake.finish_when_waited = False
    assert len(generation.images) == 1
    assert fake.creates[-1]["prefer"] == "wait=60"


def test_generate_gives_up_at_the_time_limit_and_cancels(
    fake: FakeReplicate, provider: ReplicateProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEGEN_PROVIDER_TIMEOUT_SECONDS", "0.2")
    get_settings.cache_clear()
    polls, fake.polls = fake.polls, 10_000
    try:
        with pytest.raises(TransientProviderError) as caught:
            provider.generate(Call(spec(fake.base_url), params(prompt="a slow fox"), 1))
    finally:
        fake.polls = polls
        monkeypatch.undo()
        get_settings.cache_clear()
    assert caught.value.code == "upstream_timeout"
    assert fake.creates[-1]["prefer"] == "wait=1"
    assert fake.canceled[-1] == fake.creates[-1]["id"]


def test_a_data_uri_output_is_decoded(fake: FakeReplicate, provider: ReplicateProvider) -> None:
    data = b"\x89PNG\r\n\x1a\nfake"
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    generation = provider._generation(
        Call(spec(fake.base_url), params(), 1), {"output": [uri]}, fake.base_url
    )
    assert generation.images[0].data == data
