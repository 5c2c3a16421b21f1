"""The one retry policy: how long a worker waits before trying again, and when it
stops. Every retry loop of the worker takes its policy from here (a provider call,
a storage write, the record of a finished job), so the delays and limits of each
are read in one place:

- a provider call: ``IMAGEGEN_PROVIDER_BACKOFF_SECONDS`` doubling up to
  ``IMAGEGEN_PROVIDER_BACKOFF_MAX_SECONDS``, each within 20% either way (calls that
  failed together do not come back together), an upstream's Retry-After winning;
  ``IMAGEGEN_PROVIDER_MAX_ATTEMPTS`` calls in all;
- a storage write: 0.5 s doubling up to ``IMAGEGEN_STORAGE_BACKOFF_MAX_SECONDS``,
  for as long as the outage lasts (the job keeps its paid-for images);
- recording a finished job: 0.5 s doubling up to 10 s, for
  ``IMAGEGEN_RECORD_RETRY_SECONDS``; past that the job is left to its lease.

The loops stay where they are (each waits in its own way: a job's wait ends early
when its lease is lost); what they share is this arithmetic.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from shared.core.settings import Settings


@dataclass(frozen=True)
class RetryPolicy:
    first: float
    """Seconds before the second try."""
    cap: float
    """The longest wait, a hint included."""
    jitter: float = 0.0
    """Each wait is scaled by a random factor within this fraction either way."""
    attempts: int | None = None
    """Tries in all, the first included; None: no limit."""
    seconds: float | None = None
    """Give up once this long has passed since the first try; None: no limit."""

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """The wait after try number ``attempt`` (1 is the first) failed; ``hint``
        is what the other side asked for (Retry-After), if anything."""
        if hint is not None:
            return min(max(0.0, hint), self.cap)
        wait = self.first * 2.0 ** (attempt - 1)
        if self.jitter:
            wait *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(wait, self.cap)

    def exhausted(self, attempt: int, started: float) -> bool:
        """Whether to stop after try number ``attempt`` failed; ``started`` is the
        ``time.monotonic()`` of the first try."""
        if self.attempts is not None and attempt >= self.attempts:
            return True
        return self.seconds is not None and time.monotonic() - started >= self.seconds


def provider_calls(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        first=settings.provider_backoff_seconds,
        cap=settings.provider_backoff_max_seconds,
        jitter=0.2,
        attempts=settings.provider_max_attempts,
    )


def storage_writes(settings: Settings) -> RetryPolicy:
    return RetryPolicy(first=0.5, cap=settings.storage_backoff_max_seconds)


def database_records(settings: Settings) -> RetryPolicy:
    return RetryPolicy(first=0.5, cap=10.0, seconds=settings.record_retry_seconds)
