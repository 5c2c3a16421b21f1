"""Budgets in a real Redis (issue 26): the atomic reservation of estimates (no
overshoot under concurrent requests), settlement at the real cost in the period
reserved, counters started from SQL, failing open; a key's own budget binding its
batches; the sweeper settling what a lost settle left held. The requests themselves
(429 ``insufficient_quota`` through the `openai` package, a batch running out) are
in tests/e2e/test_keys_and_limits.py, on the stack that has Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlmodel import col

from shared.batches.models import Batch, BatchItem, BatchStatus
from shared.core.clock import utcnow
from shared.core.context import current
from shared.core.db import unit_of_work
from shared.core.errors import InsufficientQuota
from shared.core.ids import new_id
from shared.jobs.models import Job, JobStatus
from shared.projects.budgets import HELD, Budget, Budgets, spent_in_sql
from shared.projects.models import ApiKey
from shared.projects.service import Principal, create_key, create_project, revoke_key
from shared.registry import Price, get_registry
from tests.service.conftest import Service
from tests.support.processes import RedisServer, free_port
from worker.sweeper import sweep_once


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
    assert budgets.client.zscore(HELD, "job_settled") is not None  # held till settled
    budgets.settle("job_settled", 0.04)  # token-priced: cheaper than estimated
    budgets.settle("job_settled", 0.04)  # settled once
    budgets.release(["job_failed"])  # failed or canceled: costs nothing
    assert _counter(budgets, day) == {"spent": 40_000, "reserved": 0}
    assert not budgets.client.exists("imagegen:budget:job:job_settled")
    assert budgets.client.zscore(HELD, "job_settled") is None
    assert budgets.client.zscore(HELD, "job_failed") is None
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


@pytest.fixture
def with_budgets(budgets: Budgets, monkeypatch: pytest.MonkeyPatch) -> Budgets:
    """The service's budgets counted in this Redis (every process step asks its
    context), and a procedural model with a price (its jobs run here, at a cost)."""
    monkeypatch.setitem(current()._made, "budgets", budgets)
    registry = get_registry()
    priced = registry.get("procedural").model_copy(
        update={"name": "priced-here", "price": Price(per_image=0.01)}
    )
    monkeypatch.setattr(registry, "models", [*registry.models, priced])
    return budgets


def _batch_done(batch_id: str, timeout: float = 20) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        with unit_of_work() as session:
            batch = session.get(Batch, batch_id)
            assert batch is not None
            if batch.status == BatchStatus.completed or time.monotonic() > deadline:
                session.expunge(batch)
                return batch
        time.sleep(0.02)


def test_a_keys_own_budget_binds_its_batches(service: Service, with_budgets: Budgets) -> None:
    """A key with a daily budget (its project has none): its batch stops at the
    key's budget, the rest failed ``insufficient_quota``, and the spend is the key's
    (its counter, its jobs in SQL). Revoked, its next batch still counts against it."""
    with unit_of_work() as session:
        key, plaintext = create_key(session, f"keyed-{new_id('p')}")
        key.daily_budget_usd = 0.035  # set here: the service tier's API refuses it
        key_id = key.id
    with service.client(plaintext) as client:
        made = client.post(
            "/v1/images/batches",
            json={"model": "priced-here", "size": "64x64", "prompts": [f"k{i}" for i in range(6)]},
        )
        assert made.status_code == 200, made.text
        batch = _batch_done(made.json()["id"])
        assert batch.key_id == key_id
        items = client.get(f"/v1/images/batches/{batch.id}/items").json()["data"]
        usage = {
            f"{b['scope']}/{b['period']}": b for b in client.get("/v1/usage").json()["budgets"]
        }
    assert [i["status"] for i in items] == ["succeeded"] * 3 + ["failed"] * 3
    for item in items[3:]:
        error = item["response"]["body"]["error"]
        assert (item["response"]["status_code"], error["code"]) == (429, "insufficient_quota")
        assert "API key's daily budget of $0.0350" in error["message"]
    key_day = usage["key/day"]
    assert (key_day["budget_usd"], key_day["spent_usd"], key_day["reserved_usd"]) == (
        0.035,
        0.03,
        0.0,
    )
    assert usage["project/day"]["spent_usd"] == 0.03
    day = Budget("key", key_id, "day", 0.035)
    with unit_of_work() as session:
        assert spent_in_sql(session, day, utcnow()) == pytest.approx(0.03)  # jobs carry key_id

    # Revoked between its batch's creation and its lines: spend is still the key's.
    lines = "\n".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/images/generations",
                "body": {"model": "priced-here", "prompt": f"r{i}", "size": "64x64"},
            }
        )
        for i in range(2)
    )
    with service.paused(), service.client(plaintext) as client:
        source = client.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", lines.encode(), "application/jsonl")},
        ).json()
        openai_batch: dict[str, Any] = client.post(
            "/v1/batches",
            json={
                "input_file_id": source["id"],
                "endpoint": "/v1/images/generations",
                "completion_window": "24h",
            },
        ).json()
        with unit_of_work() as session:
            revoke_key(session, key_id)
    late = _batch_done(openai_batch["id"])
    with unit_of_work() as session:
        revoked = session.get(ApiKey, key_id)
        assert revoked is not None
        assert revoked.revoked_at is not None
        codes = session.execute(
            sa.select(col(BatchItem.status), col(BatchItem.error)).where(
                col(BatchItem.batch_id) == late.id
            )
        ).all()
    assert late.key_id == key_id
    assert [(s, (e or {}).get("code")) for s, e in codes] == [("failed", "insufficient_quota")] * 2
    assert _counter(with_budgets, day) == {"spent": 30_000, "reserved": 0}


def test_the_sweeper_settles_what_a_lost_settle_left_held(
    service: Service, with_budgets: Budgets
) -> None:
    """A worker died after its job's commit, before the settle: one sweep settles
    it from the job's row (a success at its cost, a failure releasing), releases a
    reservation whose job was never recorded, and leaves a running job's alone."""
    budgets = with_budgets
    now = utcnow()
    with unit_of_work() as session:
        project = create_project(session, f"held-{new_id('p')}")
        rows = {
            name: Job(
                project_id=project.id,
                model="priced-here",
                request={},
                status=JobStatus.running,
                lease_token="t",
                lease_expires_at=now + timedelta(hours=1),
            )
            for name in ("succeeded", "failed", "running")
        }
        session.add_all(rows.values())
        ids = {name: job.id for name, job in rows.items()}
    ids |= {"never": new_id("job"), "young": new_id("job")}  # no rows: never recorded
    day = Budget("project", project.id, "day", 1.0)
    assert budgets.reserve([day], list(ids.values()), [0.1] * 5, unit_of_work) == (5, None)
    with unit_of_work() as session:  # they end; their settles are lost
        for name, cost in (("succeeded", 0.03), ("failed", None)):
            job = session.get(Job, ids[name])
            assert job is not None
            job.status, job.cost_usd, job.finished_at = JobStatus(name), cost, now
            job.lease_token = job.lease_expires_at = None
            session.add(job)
    # Made twenty minutes ago (the young one six): past the sweeper's wait.
    old = now.timestamp() - 20 * 60
    budgets.client.zadd(HELD, {job_id: old for job_id in ids.values()})
    budgets.client.zadd(HELD, {ids["young"]: now.timestamp() - 6 * 60})
    sweep_once()
    assert _counter(budgets, day) == {"spent": 30_000, "reserved": 200_000}
    held = {name for name, job_id in ids.items() if budgets.client.zscore(HELD, job_id)}
    assert held == {"running", "young"}
    # The running job's is looked at again only minutes later, not every sweep.
    seen = budgets.client.zscore(HELD, ids["running"])
    assert seen is not None
    assert seen > now.timestamp() - 60
