"""The fake upstream's rate limit (issue 26's benchmark and e2e deployments): a
per-minute limit of images enforced per second as OpenAI quantizes its limits,
answered past it with OpenAI's 429 and headers; its delay; and its own process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.fake_upstream import EXPECTED_KEY, FakeUpstream, TokenBucket, _duration

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_holds_one_seconds_worth_refilled_continuously() -> None:
    clock = Clock()
    bucket = TokenBucket(600, clock)  # 10 a second: a bucket of 10, not 600
    assert bucket.capacity == 10
    assert [bucket.take(1) for _ in range(10)] == [0.0] * 10
    assert bucket.take(1) == pytest.approx(0.1)  # one image's refill
    assert bucket.take(3) == pytest.approx(0.3)  # refused calls take nothing
    clock.now += 0.25
    assert bucket.remaining() == 2
    assert bucket.take(2) == 0.0
    assert bucket.reset_in() == pytest.approx(1.0 - 0.05)  # 9.5 images short, 10 a second


def test_a_slow_limit_still_admits_one_and_a_large_call_waits_for_a_full_bucket() -> None:
    clock = Clock()
    bucket = TokenBucket(30, clock)  # one image every 2 s: a bucket of 1
    assert bucket.capacity == 1
    assert bucket.take(1) == 0.0
    assert bucket.take(1) == pytest.approx(2.0)
    clock.now += 2
    assert bucket.take(4) == 0.0  # larger than the bucket: it passes full ...
    assert bucket.take(1) == pytest.approx(8.0)  # ... and is paid for: 30 a minute
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


def test_durations_are_written_as_openais_headers_write_them() -> None:
    assert _duration(0.0121) == "13ms"
    assert _duration(1) == "1s"
    assert _duration(41.724) == "41.724s"
    assert _duration(360) == "6m0s"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


def _generate(client: httpx.Client, n: int = 1) -> httpx.Response:
    return client.post("/images/generations", json={"prompt": "p", "n": n, "size": "64x64"})


def test_past_the_limit_it_answers_openais_429_with_retry_after(upstream: FakeUpstream) -> None:
    upstream.images_per_minute = 120  # 2 a second: a bucket of 2
    headers = {"Authorization": f"Bearer {EXPECTED_KEY}"}
    with httpx.Client(base_url=upstream.base_url, headers=headers) as client:
        first = _generate(client)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "120"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-reset-requests"].endswith("ms")  # ~500ms
        assert _generate(client).status_code == 200
        refused = _generate(client)
        assert refused.status_code == 429
        body = refused.json()
        assert body["error"]["type"] == "requests"
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert body["error"]["param"] is None
        assert body["error"]["message"].startswith("Rate limit reached for ")
        assert refused.headers["Retry-After"] == "1"  # whole seconds, rounded up
        assert 400 < int(refused.headers["retry-after-ms"]) <= 500
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert upstream.rate_limited == 1
        time.sleep(int(refused.headers["retry-after-ms"]) / 1000)
        assert _generate(client).status_code == 200
    assert upstream.rate_limited == 1


def test_the_openai_package_reads_it_as_a_rate_limit_error(upstream: FakeUpstream) -> None:
    upstream.images_per_minute = 60
    with openai.OpenAI(api_key=EXPECTED_KEY, base_url=upstream.base_url, max_retries=0) as client:
        client.images.generate(model="dall-e-2", prompt="p", size="256x256")
        with pytest.raises(openai.RateLimitError) as raised:
            client.images.generate(model="dall-e-2", prompt="p", size="256x256")
    assert raised.value.code == "rate_limit_exceeded"
    assert raised.value.type == "requests"
    assert raised.value.response.headers["retry-after"] == "1"


def test_without_a_limit_nothing_changes_and_delay_slows_every_call(
    upstream: FakeUpstream,
) -> None:
    headers = {"Authorization": f"Bearer {EXPECTED_KEY}"}
    with httpx.Client(base_url=upstream.base_url, headers=headers) as client:
        for _ in range(5):
            answer = _generate(client, n=4)
            assert answer.status_code == 200
            assert "x-ratelimit-limit-requests" not in answer.headers
        upstream.delay = 0.2
        started = time.monotonic()
        assert _generate(client).status_code == 200
        assert time.monotonic() - started >= 0.2
        upstream.mode = "429"  # the modes as before
        answer = _generate(client)
    assert answer.status_code == 429
    assert answer.headers["Retry-After"] == "30"
    assert upstream.rate_limited == 1


def test_it_serves_from_a_process_of_its_own() -> None:
    command = [sys.executable, "-m", "tests.support.fake_upstream", "--port", "0"]
    options = ["--images-per-minute", "60", "--delay", "0.05"]
    with subprocess.Popen(
        [*command, *options], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            base_url = server.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:")
            assert base_url.endswith("/v1")
            headers = {"Authorization": f"Bearer {EXPECTED_KEY}"}
            with httpx.Client(base_url=base_url, headers=headers) as client:
                assert _generate(client).status_code == 200
                assert _generate(client).status_code == 429
        finally:
            server.terminate()
            assert server.wait(10) == 0
