"""The one retry policy (shared/core/retry.py): the waits each loop takes, and when
it stops."""

from __future__ import annotations

import time

from shared.core import retry
from shared.core.settings import Settings

SETTINGS = Settings(
    provider_backoff_seconds=2.0,
    provider_backoff_max_seconds=60.0,
    provider_max_attempts=4,
    storage_backoff_max_seconds=30.0,
    record_retry_seconds=300.0,
)


def test_provider_calls_double_with_jitter_and_stop_after_their_attempts() -> None:
    policy = retry.provider_calls(SETTINGS)
    for attempt, base in ((1, 2.0), (2, 4.0), (3, 8.0)):
        waits = [policy.delay(attempt) for _ in range(200)]
        assert base * 0.8 <= min(waits) < max(waits) <= base * 1.2
    assert policy.delay(10) == 60.0  # capped
    now = time.monotonic()
    assert [policy.exhausted(n, now) for n in (1, 2, 3, 4)] == [False, False, False, True]


def test_an_upstreams_retry_after_wins_within_the_cap() -> None:
    policy = retry.provider_calls(SETTINGS)
    assert policy.delay(1, hint=7.0) == 7.0
    assert policy.delay(3, hint=0.0) == 0.0
    assert policy.delay(1, hint=3600.0) == 60.0


def test_storage_writes_wait_longer_each_time_and_never_give_up() -> None:
    policy = retry.storage_writes(SETTINGS)
    assert [policy.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert not policy.exhausted(10_000, time.monotonic() - 86_400)


def test_records_are_tried_again_for_their_window_only() -> None:
    policy = retry.database_records(SETTINGS)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1, 2, 4, 8, 10]
    assert not policy.exhausted(50, time.monotonic() - 299)
    assert policy.exhausted(2, time.monotonic() - 301)
