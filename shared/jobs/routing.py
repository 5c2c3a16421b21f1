"""Where a job's provider call goes (issue 26): the model's deployments, in a
weighted random order among those not cooling down, then its fallback models in
order, each only where it can take the request (shared/jobs/input.py:for_fallback).

A deployment that answers a transient error (429, 5xx, a timeout, an answer with
fewer images than asked) cools down for its Retry-After, or COOLDOWN_SECONDS, and
the attempt moves on to the next target. A permanent refusal (400, content policy)
does not move on. A model without ``deployments`` is its one implicit deployment and
never cools down: with nowhere else to go, its call is retried with the provider
retry policy's backoff, as before.

Cooldowns are shared by every worker process and host through Redis (a key per
deployment that expires with its cooldown); in embedded mode, without Redis, each
process keeps its own. The deployments' ``images_per_minute`` and
``max_concurrency`` are held in shared/jobs/capacity.py: a deployment at its limit
is passed over, not failed, and a job whose every deployment is at its limit waits
(worker/produce.py) rather than spilling into a fallback.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

import redis

from shared.jobs.input import for_fallback
from shared.jobs.schemas import GenerationParams
from shared.registry import Deployment, ModelSpec, OpenAIModel, Registry

COOLDOWN_SECONDS = 10.0
# The weighted order's draws: one generator for the process (seeding one per call
# reads the OS's entropy on every provider call).
_RNG = random.Random()
KEY = "imagegen:cooldown:{model}:{deployment}"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One place to send the call: the entry as it serves it, the request as it
    takes it, and what is recorded as ``served_by``."""

    spec: ModelSpec
    params: GenerationParams
    model: str
    deployment: str
    cools: bool  # one of several: it cools down when it fails
    limits: Deployment | None = None  # its images_per_minute and max_concurrency

    @property
    def served_by(self) -> dict[str, str]:
        return {"model": self.model, "deployment": self.deployment}


class Cooldowns:
    """Deployments cooling down: in Redis where there is one (shared by every
    process), else in this process; each also noted here, until when (monotonic
    seconds), so a Redis outage leaves this process's own knowledge."""

    def __init__(self, client: redis.Redis | None = None) -> None:
        self._client = client
        self._until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def cool(self, target: Target, seconds: float | None) -> None:
        if not target.cools:
            return
        seconds = COOLDOWN_SECONDS if seconds is None else max(0.0, seconds)
        until = time.monotonic() + seconds
        with self._lock:
            key = (target.model, target.deployment)
            self._until[key] = max(until, self._until.get(key, 0.0))
        if self._client is not None and seconds > 0:
            name = KEY.format(model=target.model, deployment=target.deployment)
            try:
                self._client.set(name, 1, px=max(1, int(seconds * 1000)))
            except redis.RedisError as exc:
                log.warning("cooldown of %s not shared: %s", name, exc)

    def cooling(self, model: str, deployment: str) -> bool:
        with self._lock:
            if self._until.get((model, deployment), 0.0) > time.monotonic():
                return True
        if self._client is None:
            return False
        try:
            return bool(self._client.exists(KEY.format(model=model, deployment=deployment)))
        except redis.RedisError:
            return False

    def shortest(self) -> float | None:
        """Seconds until the first cooling deployment is ready again."""
        now = time.monotonic()
        with self._lock:
            waits = [until - now for until in self._until.values() if until > now]
        return min(waits) if waits else None


def targets(
    spec: ModelSpec,
    params: GenerationParams,
    registry: Registry,
    cooldowns: Cooldowns,
    rng: random.Random | None = None,
) -> list[Target]:
    """The targets of one attempt, in the order to try them."""
    rng = rng or _RNG
    found = _of(spec, params, cooldowns, rng)
    for name in spec.fallbacks:
        fallback = registry.get(name)
        taken = for_fallback(params, fallback)
        if taken is not None:
            found += _of(fallback, taken, cooldowns, rng)
    return found


def _of(
    spec: ModelSpec, params: GenerationParams, cooldowns: Cooldowns, rng: random.Random
) -> list[Target]:
    if not isinstance(spec, OpenAIModel) or not spec.deployments:
        return [Target(spec, params, spec.name, spec.name, cools=False)]
    # A weighted order without replacement (Efraimidis and Spirakis): each
    # deployment's key is u ** (1 / weight), highest first.
    order = sorted(spec.deployments, key=lambda d: rng.random() ** (1 / d.weight), reverse=True)
    return [
        Target(spec.served_by(d), params, spec.name, d.id, cools=True, limits=d)
        for d in order
        if not cooldowns.cooling(spec.name, d.id)
    ]
