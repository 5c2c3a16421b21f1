"""A deployment's declared limits (issue 26): ``images_per_minute`` and
``max_concurrency``, held for every worker process and host in Redis, so a model
spread over several keys runs at their summed limits without the upstreams'
429s.

The rate is a generic cell rate (GCRA): one key per deployment holds the time its
budget of images is spent up to (its "theoretical arrival time"); a call of ``n``
images may go when that time plus ``n`` images' share is within one burst of now.
The burst is one second's worth of the limit, as OpenAI enforces a per-minute
limit over shorter periods (docs: "Rate limits", "quantization"): a whole
minute's burst at once would be answered 429. Concurrency is a sorted set of the
calls in flight, each with the time its lease ends, so a worker that dies never
holds a slot past its lease.

Interactive jobs (sync and async single requests) go ahead of batch lines for the
same capacity: batch lines leave a tenth of the burst more (at least one image), and one
concurrency slot, to them, and queue for tickets where they do not. That tenth is
also the slack the upstream's own bucket keeps while a batch runs it at its limit:
without it, calls granted one share apart that reach the upstream a few
milliseconds closer together are answered 429 (measured by bench/bench_routing.py:
12 429s in a 2,000-line run without it).

A call refused gets how long to wait. Where every target refused, the job books a
ticket at the target with the shortest wait (``book``): tickets are handed out in
order, each one image-share later than the last, so waiting jobs come back one by
one as room frees instead of all at once (no herd, no busy loop). Interactive jobs
take no ticket: they come back at the first room.

Without Redis (embedded mode) the limits are not enforced: one process, and a 429
still cools the deployment down (shared/jobs/routing.py). With Redis unreachable
they fail open, logged, like the project limits.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from shared.jobs.routing import Target

log = logging.getLogger(__name__)

BURST_SECONDS = 1.0
# Calls granted one share apart can reach the upstream a little closer together
# (network, scheduling): each call leaves this much of the burst unused, and one
# as large as the whole burst waits for the bucket to have been full this long
# (bench/bench_routing.py and tests/e2e/test_routing.py met 429s without it).
JITTER_SECONDS = 0.02
# A job refused for concurrency alone comes back this often: when a call ends is
# not known in advance.
BUSY_WAIT_SECONDS = 0.25
KEYS = (
    "imagegen:rate:{model}:{deployment}",
    "imagegen:busy:{model}:{deployment}",
    "imagegen:ticket:{model}:{deployment}",
)

# KEYS: rate (theoretical arrival time), busy (call id -> lease end), ticket (the
# waiting line's end). ARGV, times in microseconds: images, interactive (1/0), call
# id, lease, time per image (0: no rate), burst, max concurrency (0: none), busy
# wait, book (1/0), jitter margin. Returns {1, 0, 0} (taken) or {0, microseconds to
# wait, 1 if for a slot else 0}; a booking returns {0, microseconds until the
# ticket's turn, 0}, or the busy wait for a slot. The clock is Redis's own: one
# clock for every host. Microseconds, stored with %.0f: a per-image time rounded
# to milliseconds would run a 1,800-a-minute limit 2% slow or fast.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function ms(us) return math.max(1, math.ceil(us / 1000)) end
local function num(v) return string.format('%.0f', v) end
local images = tonumber(ARGV[1])
local interactive = ARGV[2] == '1'
local period = tonumber(ARGV[5])
local burst = tonumber(ARGV[6])
local maxc = tonumber(ARGV[7])
local need = images * period
local jitter = tonumber(ARGV[10])
local cap = burst - jitter
if not interactive then cap = cap - math.max(period, math.floor(burst / 10)) end
local slack = cap
if need > cap then slack = need - jitter end
if ARGV[9] == '1' then
  if period == 0 then return {0, tonumber(ARGV[8]), 1} end
  if maxc > 0 then
    -- Refused for a slot, not for the rate: no ticket (the line would move on
    -- for nothing each time it came back).
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    local room = maxc
    if not interactive and maxc > 1 then room = maxc - 1 end
    if redis.call('ZCARD', KEYS[2]) >= room then return {0, tonumber(ARGV[8]), 1} end
  end
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
  local line = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), tat)
  local at = line + need
  redis.call('SET', KEYS[3], num(at), 'PX', ms(at - now + burst))
  return {0, math.max(0, at - slack - now), 0}
end
local wait, slots = 0, 0
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local room = maxc
  if not interactive and maxc > 1 then room = maxc - 1 end
  if redis.call('ZCARD', KEYS[2]) >= room then wait = tonumber(ARGV[8]); slots = 1 end
end
local tat = now
if period > 0 then
  local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
  -- Not clamped to now: a call larger than its cap waits for the bucket to have
  -- been full for the jitter margin.
  local allow = stored + need - slack
  if allow - now > wait then wait = allow - now; slots = 0 end
  tat = math.max(stored, now)
end
if wait > 0 then return {0, wait, slots} end
if period > 0 then
  redis.call('SET', KEYS[1], num(tat + need), 'PX', ms(tat + need - now + burst))
end
if maxc > 0 then
  local lease = tonumber(ARGV[4])
  redis.call('ZADD', KEYS[2], num(now + lease), ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ms(lease))
end
return {1, 0, 0}
"""


@dataclass(frozen=True)
class Taken:
    """A target's answer: room taken (``call_id`` set, give it back when the call
    ends) or not (``wait``: seconds until there may be room)."""

    call_id: str | None
    wait: float = 0.0
    slots: bool = False  # refused for a concurrency slot, not for the rate


TAKEN_FREELY = Taken(call_id="")  # a target without limits (or without Redis)


class Capacity:
    """The deployments' limits, in Redis where there is one."""

    def __init__(self, client: redis.Redis | None, lease_seconds: float) -> None:
        self._client = client
        self._lease_us = max(1_000_000, int(lease_seconds * 1_000_000))
        self._take = client.register_script(_TAKE) if client is not None else None

    def limited(self, target: Target) -> bool:
        limits = target.limits
        return (
            self._take is not None
            and limits is not None
            and bool(limits.images_per_minute or limits.max_concurrency)
        )

    def take(self, target: Target, images: int, interactive: bool) -> Taken:
        """Room for one call of ``images`` images at ``target``, or how long to wait."""
        if not self.limited(target):
            return TAKEN_FREELY
        call_id = uuid.uuid4().hex
        answer = self._run(target, images, interactive, call_id, book=False)
        if answer is None:
            return TAKEN_FREELY
        taken, wait_us, slots = answer
        return Taken(call_id) if taken else Taken(None, wait_us / 1_000_000, slots)

    def book(self, target: Target, images: int) -> Taken:
        """A batch line's ticket at ``target``: seconds until its turn (or, where
        its slots are full, until it looks again)."""
        if not self.limited(target):
            return TAKEN_FREELY
        answer = self._run(target, images, False, "", book=True)
        if answer is None:
            return TAKEN_FREELY
        _, wait_us, slots = answer
        return Taken(None, wait_us / 1_000_000, slots)

    def give_back(self, target: Target, taken: Taken) -> None:
        """The call ended: its concurrency slot is free."""
        if not taken.call_id or self._client is None or not self.limited(target):
            return
        if not (target.limits and target.limits.max_concurrency):
            return
        try:
            self._client.zrem(self._keys(target)[1], taken.call_id)
        except redis.RedisError as exc:
            log.warning("concurrency slot of %s not freed (its lease frees it): %s", target, exc)

    def _run(
        self, target: Target, images: int, interactive: bool, call_id: str, book: bool
    ) -> tuple[bool, int, bool] | None:
        limits = target.limits
        if self._take is None or limits is None:
            return None
        per_minute = limits.images_per_minute
        period = round(60_000_000 / per_minute) if per_minute else 0
        args: list[str | int] = [
            images,
            int(interactive),
            call_id,
            self._lease_us,
            period,
            int(BURST_SECONDS * 1_000_000),
            limits.max_concurrency or 0,
            int(BUSY_WAIT_SECONDS * 1_000_000),
            int(book),
            int(JITTER_SECONDS * 1_000_000),
        ]
        try:
            taken, wait_us, slots = self._take(keys=self._keys(target), args=args)
        except redis.RedisError as exc:
            log.warning("deployment limits unavailable, not enforcing: %s", exc)
            return None
        return bool(taken), int(wait_us), bool(slots)

    @staticmethod
    def _keys(target: Target) -> list[str]:
        return [key.format(model=target.model, deployment=target.deployment) for key in KEYS]
