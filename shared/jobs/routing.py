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

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass

import redis

from shared.jobs.input import for_fallback
from shared.jobs.schemas import GenerationParams
from shared.registry import Deployment, ModelSpec, Registry, UpstreamModel

COOLDOWN_SECONDS = 10.0
# The weighted order's draws: one generator for the process (seeding one per call
# reads the OS's entropy on every provider call).
_RNG = random.Random()
KEY = "imagegen:cooldown:{model}:{deployment}"
DUE = "imagegen:cooldown-ended:{model}:{deployment}"
PROBE = "imagegen:probe:{model}:{deployment}"
# How long a deployment stays half open after its cooldown, waiting for a probe
# (a deployment nobody calls meanwhile is simply healthy again after it).
DUE_MS = 600_000
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
    probe: bool = False  # half open: the call that claims it tells whether it is healthy

    @property
    def served_by(self) -> dict[str, str]:
        return {"model": self.model, "deployment": self.deployment}


class Cooldowns:
    """Deployments cooling down: in Redis where there is one (shared by every
    process), else in this process; each also noted here, until when (monotonic
    seconds), so a Redis outage leaves this process's own knowledge.

    When a cooldown ends the deployment is half open: one call, by whichever
    caller claims it first (a key set only if absent) just before calling it,
    probes it while every other caller still passes it over. The probe's answer
    makes it healthy again; its failure cools it down again. So a deployment that
    keeps failing (a 429 storm, a dead host) costs one call per cooldown, not one
    per call in flight when its cooldown ends. A claim whose holder died lapses
    after ``probe_seconds``."""

    def __init__(self, client: redis.Redis | None = None, probe_seconds: float = 30.0) -> None:
        self._client = client
        self._probe_ms = max(1, int(probe_seconds * 1000))
        self._until: dict[tuple[str, str], float] = {}
        # Deployments whose cooldown ended, not yet probed back to health.
        self._due: set[tuple[str, str]] = set()
        self._probing: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def cool(self, target: Target, seconds: float | None) -> None:
        if not target.cools:
            return
        seconds = COOLDOWN_SECONDS if seconds is None else max(0.0, seconds)
        until = time.monotonic() + seconds
        key = (target.model, target.deployment)
        with self._lock:
            self._until[key] = max(until, self._until.get(key, 0.0))
            self._due.add(key)
            self._probing.pop(key, None)
        if self._client is not None:
            names = _names(target.model, target.deployment)
            try:
                pipe = self._client.pipeline(transaction=False)
                if seconds > 0:
                    pipe.set(names[0], 1, px=max(1, int(seconds * 1000)))
                pipe.set(names[1], 1, px=max(1, int(seconds * 1000)) + DUE_MS)
                pipe.delete(names[2])
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("cooldown of %s not shared: %s", names[0], exc)

    def healthy(self, target: Target) -> None:
        """A probe answered: the deployment takes calls again."""
        key = (target.model, target.deployment)
        with self._lock:
            self._due.discard(key)
            self._probing.pop(key, None)
        if self._client is not None:
            try:
                self._client.delete(*_names(target.model, target.deployment)[1:])
            except redis.RedisError as exc:
                log.warning("%s healthy, not shared: %s", target.served_by, exc)

    def unclaim(self, target: Target) -> None:
        """The probe was not made (no room at the deployment): another call may."""
        with self._lock:
            self._probing.pop((target.model, target.deployment), None)
        if self._client is not None:
            with contextlib.suppress(redis.RedisError):  # the claim lapses on its own
                self._client.delete(_names(target.model, target.deployment)[2])

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

    def states(self, model: str, deployments: list[str]) -> list[str]:
        """Each deployment's state: ``ok``, ``cooling``, or ``half_open`` (its
        cooldown ended and no probe has answered since: a call claims the probe
        (``claim``) just before it would call it, so a claim is never taken by a
        call that ends elsewhere). One round trip to Redis."""
        now = time.monotonic()
        shared: list[object] = [None] * (2 * len(deployments))
        read = False  # Redis answered: its half-open marks are the truth
        if self._client is not None:
            keys = [name for d in deployments for name in _names(model, d)[:2]]
            with contextlib.suppress(redis.RedisError):  # this process's knowledge alone
                shared, read = list(self._client.mget(keys)), True
        found = []
        for index, deployment in enumerate(deployments):
            key = (model, deployment)
            with self._lock:
                cooling_here = self._until.get(key, 0.0) > now
                due_here = key in self._due
            if cooling_here or shared[2 * index] is not None:
                found.append("cooling")
            elif shared[2 * index + 1] is not None if read else due_here:
                found.append("half_open")
            else:
                found.append("ok")
        return found

    def claim(self, target: Target) -> bool:
        """This call probes the half-open ``target``: False when another call holds
        the probe (pass it over meanwhile)."""
        key = (target.model, target.deployment)
        if self._client is not None:
            try:
                name = _names(target.model, target.deployment)[2]
                return bool(self._client.set(name, 1, nx=True, px=self._probe_ms))
            except redis.RedisError:
                pass  # this process's own claim, below
        now = time.monotonic()
        with self._lock:
            if self._probing.get(key, 0.0) > now:
                return False
            self._probing[key] = now + self._probe_ms / 1000
            return True

    def shortest(self) -> float | None:
        """Seconds until the first cooling deployment is ready again."""
        now = time.monotonic()
        with self._lock:
            waits = [until - now for until in self._until.values() if until > now]
        return min(waits) if waits else None


def _names(model: str, deployment: str) -> tuple[str, str, str]:
    """The deployment's cooldown, its half-open mark, its probe's claim."""
    return (
        KEY.format(model=model, deployment=deployment),
        DUE.format(model=model, deployment=deployment),
        PROBE.format(model=model, deployment=deployment),
    )


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
    if not isinstance(spec, UpstreamModel) or not spec.deployments:
        return [Target(spec, params, spec.name, spec.name, cools=False)]
    # A weighted order without replacement (Efraimidis and Spirakis): each
    # deployment's key is u ** (1 / weight), highest first.
    order = sorted(spec.deployments, key=lambda d: rng.random() ** (1 / d.weight), reverse=True)
    states = cooldowns.states(spec.name, [d.id for d in order])
    return [
        Target(
            spec.served_by(d),
            params,
            spec.name,
            d.id,
            cools=True,
            limits=d,
            probe=state == "half_open",
        )
        for d, state in zip(order, states, strict=True)
        if state != "cooling"
    ]
