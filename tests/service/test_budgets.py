"""Budgets in a real Redis (issue 26): the atomic reservation of estimates (no
overshoot under concurrent requests), settlement at the real cost in the period
reserved, counters started from SQL, failing open. The requests themselves (429
``insufficient_quota`` through the `openai` package, a batch running out) are in
tests/e2e/test_keys_and_limits.py, on the stack that has Redis."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.errors import InsufficientQuota
from shared.core.ids import new_id
from shared.jobs.models import Job, JobStatus
from shared.projects.budgets import Budget, Budgets
from shared.projects.service import Principal, create_project
from tests.service.conftest import Service
from tests.support.processes import RedisServer, free_port


@pytest.fixture(scope="module")
def budgets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Budgets]:
    server = RedisServer(Path(tmp_path_factory.mktemp("budgets-redis"))).start()
    client = redis.Redis.from_url(server.url)
    yield Budgets(client)
    client.close()
    assert server.proc is not None
    server.proc.terminate()
    server.proc.wait(10)


def _principal(daily: float | None = None, key_monthly: float | None = None) -> Principal:
    return Principal(
        key_id=new_id("key"),
        project_id=new_id("proj"),
        project_name="budgeted",
        user="u",
        daily_budget_usd=daily,
        key_monthly_budget_usd=key_monthly,
    )


def _counter(budgets: Budgets, budget: Budget, now: datetime | None = None) -> dict[str, int]:
    raw = budgets.client.hgetall(budget.counter(now or utcnow()))
    return {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}


def _race(budgets: Budgets, principal: Principal, amount: float, threads: int) -> int:
    """``threads`` requests at once; returns how many were reserved."""
    granted: list[str] = []
    start = threading.Barrier(threads)

    def ask() -> None:
        job_id = new_id("job")
        start.wait()
        try:
            budgets.reserve_job(principal, job_id, amount, unit_of_work)
        except InsufficientQuota:
            return
        granted.append(job_id)

    workers = [threading.Thread(target=ask) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    return len(granted)


def test_concurrent_reservations_never_pass_the_budget(service: Service, budgets: Budgets) -> None:
    principal = _principal(daily=1.00)
    assert _race(budgets, principal, 0.07, threads=20) == 14  # 14 x 0.07 = 0.98
    day = Budget("project", principal.project_id, "day", 1.00)
    assert _counter(budgets, day) == {"spent": 0, "reserved": 980_000}
    # A key's own budget binds below its project's.
    keyed = _principal(daily=1.00, key_monthly=0.30)
    assert _race(budgets, keyed, 0.07, threads=20) == 4
    month = Budget("key", keyed.key_id, "month", 0.30)
    assert _counter(budgets, month)["reserved"] == 280_000


def test_settlement_moves_the_estimate_to_the_real_cost_once(
    service: Service, budgets: Budgets
) -> None:
    principal = _principal(daily=0.25)
    day = Budget("project", principal.project_id, "day", 0.25)
    budgets.reserve_job(principal, "job_settled", 0.10, unit_of_work)
    budgets.reserve_job(principal, "job_failed", 0.10, unit_of_work)
    with pytest.raises(InsufficientQuota) as refused:
        budgets.reserve_job(principal, "job_over", 0.10, unit_of_work)
    assert "daily budget of $0.25" in refused.value.message
    assert "$0.2000 spent or reserved" in refused.value.message
    budgets.settle("job_settled", 0.04)  # token-priced: cheaper than estimated
    budgets.settle("job_settled", 0.04)  # settled once
    budgets.release(["job_failed"])  # failed or canceled: costs nothing
    assert _counter(budgets, day) == {"spent": 40_000, "reserved": 0}
    assert not budgets.client.exists("imagegen:budget:job:job_settled")
    budgets.reserve_job(principal, "job_next", 0.20, unit_of_work)  # room again


def test_a_job_settles_in_the_period_it_was_reserved_in(service: Service, budgets: Budgets) -> None:
    principal = _principal(daily=1.0)
    day = Budget("project", principal.project_id, "day", 1.0)
    yesterday = utcnow() - timedelta(days=1)
    granted, _ = budgets.reserve([day], ["job_late"], [0.5], unit_of_work, yesterday)
    assert granted == 1
    budgets.settle("job_late", 0.5)
    assert _counter(budgets, day, yesterday) == {"spent": 500_000, "reserved": 0}
    assert _counter(budgets, day) == {}  # today's untouched (not even started)


def test_a_missing_counter_starts_from_the_jobs_finished_in_the_period(
    service: Service, budgets: Budgets
) -> None:
    now = utcnow()
    with unit_of_work() as session:
        project = create_project(session, f"spent-{new_id('p')}")
        for cost, finished in ((0.30, now), (0.25, now), (5.0, now - timedelta(days=40))):
            session.add(
                Job(
                    project_id=project.id,
                    model="procedural",
                    request={},
                    status=JobStatus.succeeded,
                    cost_usd=cost,
                    finished_at=finished,
                )
            )
    principal = Principal("k", project.id, project.name, "u", daily_budget_usd=0.60)
    with pytest.raises(InsufficientQuota):
        budgets.reserve_job(principal, new_id("job"), 0.10, unit_of_work)
    day = Budget("project", project.id, "day", 0.60)
    assert _counter(budgets, day) == {"spent": 550_000, "reserved": 0}
    assert budgets.client.ttl(day.counter(now)) > 86400  # kept a day past its period
    budgets.reserve_job(principal, new_id("job"), 0.05, unit_of_work)
    with unit_of_work() as session:
        standing = budgets.standing(day, session)
    assert (standing.spent_usd, standing.reserved_usd) == (0.55, 0.05)
    assert standing.remaining_usd == pytest.approx(0.0)


def test_a_batch_reserves_the_longest_prefix_it_can_cover(
    service: Service, budgets: Budgets
) -> None:
    day = Budget("project", new_id("proj"), "day", 1.0)
    ids = [new_id("job") for _ in range(6)]
    amounts = [0.3, 0.3, 0.0, 0.3, 0.3, 0.0]
    assert budgets.reserve([day], ids, amounts, unit_of_work) == (4, day)
    assert _counter(budgets, day)["reserved"] == 900_000
    assert not budgets.client.exists(f"imagegen:budget:job:{ids[4]}")
    # A model with no price is never refused, however spent the budget.
    free = _principal(daily=0.0)
    budgets.reserve_job(free, new_id("job"), 0.0, unit_of_work)


def test_an_unreachable_redis_fails_open(service: Service) -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    down = Budgets(client)
    principal = _principal(daily=0.0)
    down.reserve_job(principal, new_id("job"), 1.0, unit_of_work)  # not refused
    down.settle("job_x", 1.0)  # logged, not raised
