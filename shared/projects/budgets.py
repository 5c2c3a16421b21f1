"""Budgets: what a project (and a key with its own) may spend in USD per UTC day and
month, counted atomically in Redis so they hold across every API and worker process.

A request's estimate (``estimate``: the model's price times n) is reserved before
its job is recorded; the job's end settles it at its real cost (``job.cost_usd``),
a failed or canceled job releases it. Concurrent requests therefore overshoot a
budget by at most what is in flight at its real cost above its estimate.

In Redis, in micro-USD (integers):

- ``imagegen:budget:{project|key}:{id}:{day|month}:{YYYYMMDD|YYYYMM}``: a hash of
  ``spent`` (settled) and ``reserved`` (in flight), expiring a day after its period.
  A missing one (first use in the period, Redis restarted) starts from SQL: the sum
  of ``job.cost_usd`` of the owner's jobs finished in the period.
- ``imagegen:budget:job:{job_id}``: what the job reserved (``amount``) and against
  which counters (``counters``), so its settlement adjusts the periods it was
  reserved in, once. Jobs in flight while Redis restarted lose theirs: their cost
  is counted again from SQL in the next period's first use, not in this one.
- ``imagegen:budget:held``: a sorted set of the jobs holding a reservation, scored
  by when it was made (or last found still running). The sweeper's ``reconcile``
  settles those whose settle was lost (a worker died between the job's commit and
  its settle, or Redis refused it) from the job's row; without it they would hold
  their estimate until the period ended.

Without Redis (embedded mode) budgets are not enforced (and setting one is refused,
as limits are). With Redis unreachable they fail open, logged, like the limits.
"""

from __future__ import annotations

import calendar
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal, cast

import redis
import sqlalchemy as sa
from sqlmodel import Session, col

from shared.core.clock import utcnow
from shared.core.context import Context, current
from shared.core.errors import InsufficientQuota
from shared.jobs.models import FINISHED, Job, JobStatus
from shared.jobs.schemas import GenerationParams
from shared.projects.schemas import BudgetStatus
from shared.projects.service import Principal
from shared.registry import ModelSpec

log = logging.getLogger(__name__)

MICRO = 1_000_000
# A job's reservation outlives any wait in a queue (a batch's window is a day).
JOB_TTL_SECONDS = 35 * 86400
HELD = "imagegen:budget:held"
# The sweeper's reconciliation (``Budgets.reconcile``): a reservation is looked at
# once it is this old (its settle had time to happen), a job still queued or running
# again as long after, and one whose job has no row at all (the request that made
# it never committed) is released once it is this old.
RECONCILE_AFTER_SECONDS = 300
ORPHAN_AFTER_SECONDS = 900
RECONCILE_BATCH = 500

Sessions = Callable[[], AbstractContextManager[Session]]
"""Opens a session for the read-only SQL that starts a missing counter."""

# --- the estimate -----------------------------------------------------------------

# Output image tokens per image of gpt-image-1, by quality and size: OpenAI's image
# generation guide, "Cost and latency" (platform.openai.com/docs/guides/image-generation;
# the same table is quoted at community.openai.com/t/1371851).
OUTPUT_TOKENS: dict[str, dict[str, int]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
# OpenAI's rule of thumb for English text: about four characters a token.
CHARS_PER_TOKEN = 4


def output_tokens(size: str, quality: str | None) -> int:
    """One image's output tokens by the table above. A quality it does not name
    (``auto``, none, dall-e's ``standard``/``hd``) counts as ``high`` and ``auto``
    size as the largest: an estimate must not fall short. Another size scales the
    square's figure by its area."""
    row = OUTPUT_TOKENS.get(quality or "", OUTPUT_TOKENS["high"])
    if size in row:
        return row[size]
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        return max(row.values())
    return max(1, math.ceil(row["1024x1024"] * int(width) * int(height) / (1024 * 1024)))


def estimate(spec: ModelSpec, params: GenerationParams) -> float:
    """What the request will cost in USD, by its model's price: per image (by size
    and quality) times n; or, token-priced, the prompt's input tokens once per
    upstream call plus each image's output tokens (``output_tokens``; an edit's
    input images are not counted: settlement corrects it). 0 without a price."""
    price = spec.price
    if price is None:
        return 0.0
    if price.per_token is not None:
        calls = math.ceil(params.n / max(1, spec.images_per_call))
        tokens_in = calls * max(1, math.ceil(len(params.prompt) / CHARS_PER_TOKEN))
        tokens_out = params.n * output_tokens(params.size, params.quality)
        return tokens_in * price.per_token.input + tokens_out * price.per_token.output
    return price.cost(params.size, params.quality, params.n, None) or 0.0


def to_micro(usd: float) -> int:
    """USD as whole micro-USD, rounded up (an estimate never falls short by rounding)."""
    return max(0, math.ceil(round(usd * MICRO, 3)))


# --- what a job is counted against ----------------------------------------------------

Period = Literal["day", "month"]
Scope = Literal["project", "key"]


@dataclass(frozen=True)
class Budget:
    """One budget: an owner's (a project or key) for one kind of period."""

    scope: Scope
    owner: str  # the project's or key's id
    period: Period
    limit_usd: float

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """The UTC period holding ``now``: its start, and the next one's."""
        day = now.astimezone(UTC).date()
        if self.period == "day":
            start = day
            end = day + timedelta(days=1)
        else:
            start = day.replace(day=1)
            end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
        return _midnight(start), _midnight(end)

    def counter(self, now: datetime) -> str:
        stamp = now.astimezone(UTC).strftime("%Y%m%d" if self.period == "day" else "%Y%m")
        return f"imagegen:budget:{self.scope}:{self.owner}:{self.period}:{stamp}"

    def refusal(
        self, now: datetime, amount_usd: float, used_usd: float | None = None
    ) -> InsufficientQuota:
        """The 429 of a request (estimated ``amount_usd``) this budget cannot cover."""
        whose = "This project's" if self.scope == "project" else "This API key's"
        when = "daily" if self.period == "day" else "monthly"
        used = "" if used_usd is None else f"; ${used_usd:.4f} spent or reserved this {self.period}"
        _, end = self.bounds(now)
        return InsufficientQuota(
            f"{whose} {when} budget of ${_usd(self.limit_usd)} cannot cover this request "
            f"(estimated ${amount_usd:.4f}{used}). It resets at {end:%Y-%m-%d %H:%M} UTC.",
            retry_after=max(1.0, (end - now).total_seconds()),
        )


def _usd(value: float) -> str:
    """Cents where they say it all, else to the hundredth of a cent."""
    return f"{value:.2f}" if abs(value - round(value, 2)) < 1e-9 else f"{value:.4f}"


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _set(scope: Scope, owner: str, daily: float | None, monthly: float | None) -> list[Budget]:
    day = [Budget(scope, owner, "day", daily)] if daily is not None else []
    return day + ([Budget(scope, owner, "month", monthly)] if monthly is not None else [])


def project_budgets(project_id: str, daily: float | None, monthly: float | None) -> list[Budget]:
    return _set("project", project_id, daily, monthly)


def key_budgets(key_id: str, daily: float | None, monthly: float | None) -> list[Budget]:
    return _set("key", key_id, daily, monthly)


def budgets_of(principal: Principal) -> list[Budget]:
    """The budgets a request of ``principal`` counts against: its project's and its
    key's own."""
    project = _set(
        "project", principal.project_id, principal.daily_budget_usd, principal.monthly_budget_usd
    )
    own = _set(
        "key", principal.key_id, principal.key_daily_budget_usd, principal.key_monthly_budget_usd
    )
    return project + own


def spent_in_sql(session: Session, budget: Budget, now: datetime) -> float:
    """What the owner's jobs finished in the period cost (read-only: the job table
    is the lifecycle's to write)."""
    start, end = budget.bounds(now)
    owner = col(Job.project_id) if budget.scope == "project" else col(Job.key_id)
    total = session.execute(
        sa.select(sa.func.sum(col(Job.cost_usd))).where(
            owner == budget.owner, col(Job.finished_at) >= start, col(Job.finished_at) < end
        )
    ).scalar_one()
    return float(total or 0.0)


# --- Redis ------------------------------------------------------------------------------

# KEYS: the budget counters, then one hash per job, then the held set. ARGV[1]: the
# number of counters c; ARGV[2..c+1]: their limits; ARGV[c+2]: the jobs' hash ttl;
# ARGV[c+3]: now (epoch seconds); then each job's id and amount (micro-USD), in
# pairs. Takes the longest prefix of jobs every counter can cover (a job of amount 0
# always fits), reserves it and remembers each job's amount and counters, and the
# job among those held. Returns {granted, the counter that stopped it (0: none)},
# or {-1, i} when counter i is missing (start it, then call again).
_RESERVE = """
local c = tonumber(ARGV[1])
for i = 1, c do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-1, i} end
end
local room = {}
for i = 1, c do
  local h = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  room[i] = tonumber(ARGV[1 + i]) - (tonumber(h[1]) or 0) - (tonumber(h[2]) or 0)
end
local ttl = tonumber(ARGV[c + 2])
local now = ARGV[c + 3]
local held = KEYS[#KEYS]
local counters = table.concat(KEYS, ' ', 1, c)
local granted, total, blocked = 0, 0, 0
for j = c + 4, #ARGV, 2 do
  local amount = tonumber(ARGV[j + 1])
  for i = 1, c do
    if amount > 0 and total + amount > room[i] then
      blocked = i
      break
    end
  end
  if blocked > 0 then break end
  total = total + amount
  granted = granted + 1
  local job = KEYS[c + granted]
  redis.call('HSET', job, 'amount', amount, 'counters', counters)
  redis.call('EXPIRE', job, ttl)
  redis.call('ZADD', held, now, ARGV[j])
end
if total > 0 then
  for i = 1, c do redis.call('HINCRBY', KEYS[i], 'reserved', total) end
end
return {granted, blocked}
"""

# KEYS: the counters to start. ARGV: pairs of (spent, ttl). A counter another
# process started meanwhile is left as it is.
_START = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'spent', ARGV[2 * i - 1], 'reserved', 0)
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2 * i]))
  end
end
return 0
"""

# KEYS: the job's hash, the held set. ARGV: its real cost (micro-USD; 0 releases),
# the job's id. Its amount leaves each counter's reserved and its cost joins their
# spent, once: the hash goes, and the job leaves the held set.
_SETTLE = """
redis.call('ZREM', KEYS[2], ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'amount', 'counters')
if not h[1] then return 0 end
local amount = tonumber(h[1])
local cost = tonumber(ARGV[1])
for key in string.gmatch(h[2] or '', '%S+') do
  if redis.call('EXISTS', key) == 1 then
    if redis.call('HINCRBY', key, 'reserved', -amount) < 0 then
      redis.call('HSET', key, 'reserved', 0)
    end
    if cost > 0 then redis.call('HINCRBY', key, 'spent', cost) end
  end
end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass(frozen=True)
class Standing:
    """A budget now: what is settled and what is reserved, in USD."""

    budget: Budget
    period_start: date
    resets_at: datetime
    spent_usd: float
    reserved_usd: float

    @property
    def remaining_usd(self) -> float:
        return max(0.0, self.budget.limit_usd - self.spent_usd - self.reserved_usd)


class Budgets:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._reserve = client.register_script(_RESERVE)
        self._start = client.register_script(_START)
        self._settle = client.register_script(_SETTLE)

    def reserve(
        self,
        budgets: Sequence[Budget],
        job_ids: Sequence[str],
        amounts: Sequence[float],
        sessions: Sessions,
        now: datetime | None = None,
    ) -> tuple[int, Budget | None]:
        """Reserve each job's amount (USD), in order, as far as every budget covers
        them; returns how many were reserved and the budget that stopped the rest.
        Jobs that cost nothing (no price) are never refused and reserve nothing,
        nor are jobs under no budget."""
        if not budgets or not any(a > 0 for a in amounts):
            return len(job_ids), None
        held_at = utcnow().timestamp()  # when, whatever period it is reserved in
        now = now or utcnow()
        counters = [b.counter(now) for b in budgets]
        keys = [*counters, *(f"imagegen:budget:job:{job_id}" for job_id in job_ids), HELD]
        limits = [round(b.limit_usd * MICRO) for b in budgets]
        jobs = [
            x for job_id, a in zip(job_ids, amounts, strict=True) for x in (job_id, to_micro(a))
        ]
        args = [len(budgets), *limits, JOB_TTL_SECONDS, held_at, *jobs]
        try:
            for _ in range(3):
                granted, blocked = (int(x) for x in self._reserve(keys=keys, args=args))
                if granted >= 0:
                    return granted, budgets[blocked - 1] if blocked else None
                self._start_counters(budgets, now, sessions)
        except redis.RedisError as exc:
            log.warning("budgets unavailable, not enforcing: %s", exc)
            return len(job_ids), None
        log.warning("budget counters vanished while starting them; not enforcing")
        return len(job_ids), None

    def reserve_job(
        self, principal: Principal, job_id: str, amount: float, sessions: Sessions
    ) -> None:
        """A request's reservation: refused (429 ``insufficient_quota``) when one of
        its budgets cannot cover ``amount``."""
        now = utcnow()
        granted, blocked = self.reserve(budgets_of(principal), [job_id], [amount], sessions, now)
        if not granted and blocked is not None:
            raise blocked.refusal(now, amount, self._used(blocked, now))

    def check(self, principal: Principal, amount: float) -> None:
        """Refuse at once what a budget already cannot cover, reserving nothing (a
        stream's answer starts before its job is recorded). A counter not started
        yet passes: the reservation itself decides."""
        budgets = budgets_of(principal)
        if not budgets or amount <= 0:
            return
        now = utcnow()
        for budget in budgets:
            used = self._used(budget, now)
            limit = round(budget.limit_usd * MICRO)
            if used is not None and round(used * MICRO) + to_micro(amount) > limit:
                raise budget.refusal(now, amount, used)

    def settle(self, job_id: str, cost_usd: float | None) -> None:
        """The job ended: its reservation gives way to its real cost (None or 0: a
        failed or canceled job, or no price, releases it)."""
        self.settle_many({job_id: cost_usd})

    def settle_many(self, costs: dict[str, float | None]) -> None:
        if not costs:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for job_id, cost in costs.items():
                self._settle(
                    keys=[f"imagegen:budget:job:{job_id}", HELD],
                    args=[to_micro(cost or 0.0), job_id],
                    client=pipe,
                )
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not settle the budgets of %d job(s): %s", len(costs), exc)

    def release(self, job_ids: Sequence[str]) -> None:
        self.settle_many(dict.fromkeys(job_ids))

    def reconcile(
        self, sessions: Sessions, now: datetime | None = None, limit: int = RECONCILE_BATCH
    ) -> int:
        """The sweeper's step: settle the reservations whose settle was lost. Takes
        the ``limit`` oldest held past ``RECONCILE_AFTER_SECONDS`` (one ZRANGEBYSCORE:
        usually nothing), reads their jobs' status and cost (read-only), and settles
        the finished ones (a success at its cost, a failure or cancel releasing), and
        releases those with no job row past ``ORPHAN_AFTER_SECONDS``. Jobs still
        queued or running stay held, looked at again as long after (so a long queue
        of them never hides the ones behind it). Returns how many it settled."""
        now = now or utcnow()
        at = now.timestamp()
        try:
            raw = cast(
                list[tuple[bytes | str, float]],
                self.client.zrangebyscore(
                    HELD, "-inf", at - RECONCILE_AFTER_SECONDS, start=0, num=limit, withscores=True
                ),
            )
        except redis.RedisError as exc:
            log.warning("budgets unavailable, not reconciling: %s", exc)
            return 0
        if not raw:
            return 0
        held = {(m.decode() if isinstance(m, bytes) else str(m)): float(t) for m, t in raw}
        with sessions() as session:
            rows = session.execute(
                sa.select(col(Job.id), col(Job.status), col(Job.cost_usd)).where(
                    col(Job.id).in_(list(held))
                )
            ).all()
        costs: dict[str, float | None] = {}
        running: list[str] = []
        for job_id, status, cost in rows:
            if status == JobStatus.succeeded:
                costs[job_id] = cost
            elif status in FINISHED:
                costs[job_id] = None
            else:
                running.append(job_id)
        found = {job_id for job_id, _, _ in rows}
        for job_id, since in held.items():
            if job_id not in found and since < at - ORPHAN_AFTER_SECONDS:
                costs[job_id] = None  # reserved, never recorded
        self.settle_many(costs)
        if running:
            try:  # XX: one settled meanwhile is not added back
                self.client.zadd(HELD, dict.fromkeys(running, at), xx=True)
            except redis.RedisError as exc:
                log.warning("could not mark %d held budget(s) seen: %s", len(running), exc)
        if costs:
            log.info("budgets: settled %d reservation(s) whose settle was lost", len(costs))
        return len(costs)

    def standing(self, budget: Budget, session: Session, now: datetime | None = None) -> Standing:
        """The budget as it stands: from its counter, or from SQL where none was
        started (nothing reserved then) or Redis cannot answer."""
        now = now or utcnow()
        start, end = budget.bounds(now)
        spent = reserved = None
        try:
            raw = self.client.hmget(budget.counter(now), ["spent", "reserved"])
            if raw[0] is not None:
                spent, reserved = int(raw[0]) / MICRO, int(raw[1] or 0) / MICRO
        except redis.RedisError as exc:
            log.warning("budgets unavailable, reading spend from SQL: %s", exc)
        if spent is None:
            spent, reserved = spent_in_sql(session, budget, now), 0.0
        return Standing(budget, start.date(), end, spent, reserved or 0.0)

    def _used(self, budget: Budget, now: datetime) -> float | None:
        try:
            raw = self.client.hmget(budget.counter(now), ["spent", "reserved"])
        except redis.RedisError:
            return None
        if raw[0] is None:
            return None
        return (int(raw[0]) + int(raw[1] or 0)) / MICRO

    def _start_counters(self, budgets: Sequence[Budget], now: datetime, sessions: Sessions) -> None:
        missing = [b for b in budgets if not self.client.exists(b.counter(now))]
        if not missing:
            return
        with sessions() as session:
            spent = [spent_in_sql(session, b, now) for b in missing]
        args: list[int] = []
        for budget, usd in zip(missing, spent, strict=True):
            _, end = budget.bounds(now)
            ttl = int((end - now).total_seconds()) + 86400
            args += [to_micro(usd), ttl]
        self._start(keys=[b.counter(now) for b in missing], args=args)


class NoBudgets:
    """Embedded mode: no Redis, no budgets."""

    def reserve(
        self,
        budgets: Sequence[Budget],
        job_ids: Sequence[str],
        amounts: Sequence[float],
        sessions: Sessions,
        now: datetime | None = None,
    ) -> tuple[int, Budget | None]:
        return len(job_ids), None

    def reserve_job(
        self, principal: Principal, job_id: str, amount: float, sessions: Sessions
    ) -> None:
        pass

    def check(self, principal: Principal, amount: float) -> None:
        pass

    def settle(self, job_id: str, cost_usd: float | None) -> None:
        pass

    def settle_many(self, costs: dict[str, float | None]) -> None:
        pass

    def release(self, job_ids: Sequence[str]) -> None:
        pass

    def reconcile(
        self, sessions: Sessions, now: datetime | None = None, limit: int = RECONCILE_BATCH
    ) -> int:
        return 0

    def standing(self, budget: Budget, session: Session, now: datetime | None = None) -> Standing:
        now = now or utcnow()
        start, end = budget.bounds(now)
        return Standing(budget, start.date(), end, spent_in_sql(session, budget, now), 0.0)


def get_budgets() -> Budgets | NoBudgets:
    """The process's budgets, made once per context."""
    return current().made("budgets", _make_budgets)


def _make_budgets(context: Context) -> Budgets | NoBudgets:
    return Budgets(context.redis) if context.redis is not None else NoBudgets()


def statuses(session: Session, principal: Principal) -> list[BudgetStatus]:
    """``GET /v1/usage``'s ``budgets``: the project's day and month (with or without
    a budget: what they spent), then the key's own budgets where it has them."""
    budgets = get_budgets()
    rows: list[tuple[Scope, str, Period, float | None]] = [
        ("project", principal.project_id, "day", principal.daily_budget_usd),
        ("project", principal.project_id, "month", principal.monthly_budget_usd),
        ("key", principal.key_id, "day", principal.key_daily_budget_usd),
        ("key", principal.key_id, "month", principal.key_monthly_budget_usd),
    ]
    now = utcnow()
    shown = []
    for scope, owner, period, limit in rows:
        if scope == "key" and limit is None:
            continue
        budget = Budget(scope, owner, period, limit or 0.0)
        if limit is None:
            start, end = budget.bounds(now)
            standing = Standing(budget, start.date(), end, spent_in_sql(session, budget, now), 0.0)
        else:
            standing = budgets.standing(budget, session, now)
        shown.append(
            BudgetStatus(
                scope=budget.scope,
                period=budget.period,
                period_start=standing.period_start.isoformat(),
                resets_at=int(standing.resets_at.timestamp()),
                budget_usd=limit,
                spent_usd=round(standing.spent_usd, 6),
                reserved_usd=round(standing.reserved_usd, 6),
                remaining_usd=None if limit is None else round(standing.remaining_usd, 6),
            )
        )
    return shown
