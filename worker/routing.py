"""Where a job's provider call goes (issue 26): the model's deployments, in a
weighted random order among those not cooling down, then its fallback models in
order, each only where it can take the request (shared/jobs/input.py:for_fallback).

A deployment that answers a transient error (429, 5xx, a timeout, an answer with
fewer images than asked) cools down for its Retry-After, or COOLDOWN_SECONDS, and
the attempt moves on to the next target. A permanent refusal (400, content policy)
does not move on. A model without ``deployments`` is its one implicit deployment and
never cools down: with nowhere else to go, its call is retried with the provider
retry policy's backoff, as before.

Not built yet: cooldowns are kept per worker process (not shared through Redis),
and the deployments' ``images_per_minute`` and ``max_concurrency`` are read but
not enforced.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from shared.jobs.input import for_fallback
from shared.jobs.schemas import GenerationParams
from shared.registry import ModelSpec, OpenAIModel, Registry

COOLDOWN_SECONDS = 10.0


@dataclass(frozen=True)
class Target:
    """One place to send the call: the entry as it serves it, the request as it
    takes it, and what is recorded as ``served_by``."""

    spec: ModelSpec
    params: GenerationParams
    model: str
    deployment: str
    cools: bool  # one of several: it cools down when it fails

    @property
    def served_by(self) -> dict[str, str]:
        return {"model": self.model, "deployment": self.deployment}


class Cooldowns:
    """Deployments cooling down, until when (monotonic seconds)."""

    def __init__(self) -> None:
        self._until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def cool(self, target: Target, seconds: float | None) -> None:
        if not target.cools:
            return
        until = time.monotonic() + (COOLDOWN_SECONDS if seconds is None else seconds)
        with self._lock:
            key = (target.model, target.deployment)
            self._until[key] = max(until, self._until.get(key, 0.0))

    def cooling(self, model: str, deployment: str) -> bool:
        with self._lock:
            return self._until.get((model, deployment), 0.0) > time.monotonic()

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
    found = _of(spec, params, cooldowns, rng or random.Random())
    for name in spec.fallbacks:
        fallback = registry.get(name)
        taken = for_fallback(params, fallback)
        if taken is not None:
            found += _of(fallback, taken, cooldowns, rng or random.Random())
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
        Target(spec.served_by(d), params, spec.name, d.id, cools=True)
        for d in order
        if not cooldowns.cooling(spec.name, d.id)
    ]
