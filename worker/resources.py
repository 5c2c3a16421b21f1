"""What only a worker consumer holds, made once per process context
(shared/core/context.py): by ``make_all`` at the consumer's start, before the
pool's threads run (made lazily, hundreds of threads would race to build each)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from shared.core.context import Context, current
from shared.jobs.capacity import Capacity
from shared.jobs.routing import Cooldowns


def fanout_pool() -> ThreadPoolExecutor:
    """A job's calls when its model makes fewer images per call than asked."""
    return current().made("fanout_pool", _pool("fanout"))


def lines_pool() -> ThreadPoolExecutor:
    """A chunk of batch lines, side by side. Separate from the fan-out pool: a
    line's own fan-out must never wait for a thread held by a line of the same
    chunk."""
    return current().made("lines_pool", _pool("lines"))


def answer_slots() -> threading.Semaphore:
    """Jobs that may hold a provider's answer at once (shared/providers/answers.py)."""
    return current().made(
        "answer_slots", lambda c: threading.Semaphore(c.settings.worker_answer_slots)
    )


def webhook_client() -> httpx.Client:
    """Webhook deliveries: no redirects followed (a target is checked before it is
    called, and a redirect would skip the check)."""
    return current().made(
        "webhook_client",
        lambda c: httpx.Client(
            timeout=c.settings.webhook_timeout_seconds,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=200),
        ),
    )


def cooldowns() -> Cooldowns:
    """Deployments cooling down after a failure (shared through Redis where there
    is one: shared/jobs/routing.py)."""
    return current().made(
        "cooldowns", lambda c: Cooldowns(c.redis, c.settings.provider_timeout_seconds + 5)
    )


def capacity() -> Capacity:
    """The deployments' declared limits, held in Redis (shared/jobs/capacity.py). A
    call's concurrency slot is leased for as long as the call may take, and a
    minute more."""
    return current().made(
        "capacity", lambda c: Capacity(c.redis, c.settings.provider_timeout_seconds + 60)
    )


def make_all() -> None:
    cooldowns()
    capacity()
    fanout_pool()
    lines_pool()
    answer_slots()
    webhook_client()


def _pool(name: str) -> Callable[[Context], ThreadPoolExecutor]:
    def make(context: Context) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(
            max_workers=context.settings.worker_concurrency, thread_name_prefix=name
        )

    return make
