"""Deadlines (issue 29: ``Cancel-After``), in-process, with a clock the tests move
(each module's ``utcnow``) instead of sleeping: a job past its deadline before it
starts is never sent upstream (the provider's calls counted) and ends ``canceled``
with ``deadline_exceeded``, whether a worker's claim or the sweeper finds it; one
running when its deadline passes is stopped by the lease heartbeat, stores
nothing, and the sync request waiting on it gets the error; its budget's
reservation (a real Redis) is released, never settled; a native batch's lines
keep their own deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import col, select
from typer.testing import CliRunner

from cli.main import app as cli_app
from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.ids import new_id
from shared.core.storage import get_storage
from shared.jobs import service as jobs_service
from shared.jobs.models import Job, JobStatus
from shared.projects.budgets import HELD, Budgets, budgets_of
from shared.projects.service import Principal
from tests.service.conftest import BASE_URL, Service
from tests.support.processes import RedisServer
from worker import claim, leases, produce, runner, sweeper
from worker.batches import pump_batch

ASYNC = {"Prefer": "respond-async"}


def _later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every clock the deadline's deciders read, ``seconds`` ahead."""
    ahead: Callable[[], datetime] = lambda: utcnow() + timedelta(seconds=seconds)  # noqa: E731
    for module in (claim, leases, jobs_service):
        monkeypatch.setattr(module, "utcnow", ahead)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job ids whose provider calls were made."""
    made: list[str] = []
    generate = produce._generate

    def counted(spec: Any, params: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        made.append(job_id)
        return generate(spec, params, job_id, *args, **kwargs)

    monkeypatch.setattr(produce, "_generate", counted)
    return made


def _row(job_id: str) -> Job:
    with unit_of_work() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _counter(budgets: Budgets, key: str) -> dict[str, int]:
    raw = budgets.client.hgetall(key)
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def _queued_with_prompt(prompt: str) -> str | None:
    with unit_of_work() as session:
        for job in session.exec(select(Job).where(col(Job.status) == JobStatus.queued)):
            if job.request.get("prompt") == prompt:
                return job.id
    return None


def _until(found: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := found()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def test_cancel_after_must_be_a_bounded_duration(service: Service) -> None:
    client = service.client()
    for value in ("soon", "1s", "25h"):
        resp = client.post(
            "/v1/images/generations",
            headers={**ASYNC, "Cancel-After": value},
            json={"prompt": "x", "size": "64x64"},
        )
        assert resp.status_code == 400, value
        assert resp.json()["error"]["param"] == "Cancel-After"


def test_a_job_past_its_deadline_before_it_starts_is_never_called(
    service: Service, monkeypatch: pytest.MonkeyPatch, calls: list[str]
) -> None:
    client = service.client()
    with service.paused():
        job = client.post(
            "/v1/images/generations",
            headers={**ASYNC, "Cancel-After": "1m30s"},
            json={"prompt": "too late", "size": "64x64"},
        ).json()
        row = _row(job["id"])
        assert row.deadline_at is not None
        assert abs((row.deadline_at - row.created_at).total_seconds() - 90) < 0.01
        _later(monkeypatch, 91)
        outcome = runner.run_job(job["id"])
    assert outcome == "skipped"
    assert calls == []
    polled = client.get(f"/v1/images/jobs/{job['id']}").json()
    assert polled["status"] == "canceled"
    assert polled["error"]["code"] == "deadline_exceeded"
    assert polled["attempts"] == 0
    assert _row(job["id"]).cost_usd is None


def test_a_job_in_time_runs(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    client = service.client()
    with service.paused():
        job = client.post(
            "/v1/images/generations",
            headers={**ASYNC, "Cancel-After": "5m"},
            json={"prompt": "in time", "size": "64x64"},
        ).json()
        _later(monkeypatch, 299)
        assert runner.run_job(job["id"]) == "succeeded"


@pytest.fixture(scope="module")
def budgets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Budgets]:
    server = RedisServer(Path(tmp_path_factory.mktemp("deadline-redis"))).start()
    client = redis.Redis.from_url(server.url)
    yield Budgets(client)
    client.close()
    assert server.proc is not None
    server.proc.terminate()
    server.proc.wait(10)


def test_the_sweeper_ends_a_queued_job_past_its_deadline_and_releases_its_budget(
    service: Service, monkeypatch: pytest.MonkeyPatch, budgets: Budgets, calls: list[str]
) -> None:
    client = service.client()
    monkeypatch.setattr(jobs_service, "get_budgets", lambda: budgets)
    with service.paused():
        job = client.post(
            "/v1/images/generations",
            headers={**ASYNC, "Cancel-After": "10s"},
            json={"prompt": "nobody takes me", "size": "64x64"},
        ).json()
        principal = Principal(
            key_id=new_id("key"),
            project_id=_row(job["id"]).project_id,
            project_name="p",
            user="",
            daily_budget_usd=1.0,
        )
        budgets.reserve_job(principal, job["id"], 0.25, unit_of_work)
        [budget] = budgets_of(principal)
        assert _counter(budgets, budget.counter(utcnow())) == {"spent": 0, "reserved": 250_000}
        _later(monkeypatch, 11)
        assert sweeper.end_overdue_jobs() >= 1
        row = _row(job["id"])
        assert (row.status, row.error_code) == (JobStatus.canceled, "deadline_exceeded")
        # Released, not settled: nothing spent, nothing held.
        assert _counter(budgets, budget.counter(utcnow())) == {"spent": 0, "reserved": 0}
        assert budgets.client.zscore(HELD, job["id"]) is None
        assert runner.run_job(job["id"]) == "skipped"
    assert calls == []


def test_a_running_job_is_stopped_at_its_deadline_and_its_waiter_answered(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = service.client()
    release = threading.Event()
    generate = produce._generate

    def slow(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return generate(*args, **kwargs)

    monkeypatch.setattr(produce, "_generate", slow)
    answers: list[Any] = []
    with service.paused():
        waiting = threading.Thread(
            target=lambda: answers.append(
                client.post(
                    "/v1/images/generations",
                    headers={"Cancel-After": "30s"},
                    json={"prompt": "slow", "size": "64x64"},
                )
            )
        )
        waiting.start()
        job_id = _until(lambda: _queued_with_prompt("slow"))
        outcomes: list[str] = []
        running = threading.Thread(target=lambda: outcomes.append(runner.run_job(job_id)))
        running.start()
        # Claimed, and its lease held by this process: the row says running a moment
        # before the runner holds the lease, and a beat in between would miss it.
        _until(lambda: _row(job_id).status == JobStatus.running and leases.LEASES.holds(job_id))
        _later(monkeypatch, 31)
        leases.LEASES.renew()  # the heartbeat's beat at the deadline
        waiting.join(10)
        release.set()
        running.join(10)
    [answer] = answers
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "deadline_exceeded"
    assert outcomes == ["discarded"]
    row = _row(job_id)
    assert (row.status, row.error_code) == (JobStatus.canceled, "deadline_exceeded")
    assert list(get_storage().scan(f"{row.project_id}/{job_id}/")) == []


def test_native_batch_lines_keep_their_own_deadlines(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = service.client()
    with service.paused():
        batch = client.post(
            "/v1/images/batches",
            json={
                "cancel_after": "10s",
                "requests": [
                    {"custom_id": "short", "prompt": "a", "size": "64x64"},
                    {"custom_id": "long", "prompt": "b", "size": "64x64", "cancel_after": "1h"},
                ],
            },
        ).json()
        bad = client.post(
            "/v1/images/batches",
            json={"requests": [{"prompt": "a", "size": "64x64", "cancel_after": "forever"}]},
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "requests.0.cancel_after"
        pump_batch(batch["id"])
        with monkeypatch.context() as clock:
            _later(clock, 11)
            assert sweeper.end_overdue_jobs() == 1
    done = service.wait_for(
        f"/v1/images/batches/{batch['id']}", lambda b: b["status"] == "completed"
    )
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    items = {
        i["custom_id"]: i
        for i in client.get(f"/v1/images/batches/{batch['id']}/items").json()["data"]
    }
    assert items["short"]["status"] == "canceled"
    assert items["short"]["error"]["code"] == "deadline_exceeded"
    assert items["long"]["status"] == "succeeded"


def test_imagegen_generate_sends_cancel_after(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``imagegen generate --cancel-after``: the header reaches the API (a bound it
    breaks is refused, naming it)."""
    sent: list[dict[str, str]] = []

    def client(base_url: str, headers: dict[str, str], timeout: float) -> TestClient:
        sent.append(headers)
        return _InProcess(service.app, headers)

    monkeypatch.setattr(httpx, "Client", client)  # the module cli/generate.py calls
    result = CliRunner().invoke(
        cli_app, ["generate", "a deadline", "--cancel-after", "1s", "--api-key", service.key_a]
    )
    assert result.exit_code == 1
    assert "Cancel-After" in result.output
    assert sent[0]["Cancel-After"] == "1s"


class _InProcess(TestClient):
    """The CLI's client, on the app in this process (its lifespan already runs)."""

    def __init__(self, app: Any, headers: dict[str, str]) -> None:
        super().__init__(app, base_url=BASE_URL, headers=headers)

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
