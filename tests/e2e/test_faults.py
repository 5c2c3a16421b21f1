"""Faults under load: nothing accepted is lost, duplicated, or retried without end.

One deployment of its own (Redis, a PostgreSQL cluster, an S3 server, a slow fake
upstream, the API and a supervised worker) takes a steady stream of jobs while its
consumers are SIGKILLed several times and Redis, PostgreSQL and S3 are each stopped
and started again. No worker is started by hand: ``imagegen worker`` restarts its
consumers. Then every accepted job must have succeeded with exactly ``n`` images in
SQL and in storage, and the upstream must not have been called without end.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import sqlalchemy as sa

from tests.support.processes import PostgresCluster, S3Server, free_port, wait_for
from tests.support.stack import FINISHED, Stack

MAX_ATTEMPTS = 5


@pytest.fixture(scope="module")
def fault_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Stack, PostgresCluster, S3Server]]:
    workdir = Path(tmp_path_factory.mktemp("faults"))
    pg = PostgresCluster().init()
    s3 = S3Server(free_port()).start()
    stack = Stack(
        workdir / "stack",
        s3.url,
        pg_admin_url=pg.admin_url,
        worker_env={"IMAGEGEN_JOB_MAX_ATTEMPTS": str(MAX_ATTEMPTS)},
    )
    try:
        yield stack, pg, s3
    finally:
        stack.close()
        s3.stop()
        pg.remove()


def _query(stack: Stack, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        engine.dispose()


class Load:
    """Submits async jobs at a steady pace until stopped; keeps what was accepted."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.accepted: dict[str, tuple[str, int]] = {}  # job id -> (prompt, n)
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        rng = random.Random(7)
        i = 0
        with self.stack.client() as client:
            while not self._stop.is_set():
                n = rng.randint(1, 3)
                prompt = f"[slow=0.4] fault {i}"
                try:
                    resp = client.post(
                        "/v1/images/generations",
                        timeout=10,
                        json={"model": "fake-fast", "prompt": prompt, "n": n, "size": "64x64"},
                        headers={"Prefer": "respond-async"},
                    )
                    if resp.status_code == 202:
                        self.accepted[resp.json()["id"]] = (prompt, n)
                    else:
                        # 503 while the database is down: refused, so not accepted.
                        assert resp.status_code == 503, resp.text
                        self.refused += 1
                except httpx.TransportError:
                    self.refused += 1
                i += 1
                self._stop.wait(0.15)


def test_faults_under_load_lose_duplicate_and_repeat_nothing(
    fault_stack: tuple[Stack, PostgresCluster, S3Server],
) -> None:
    stack, pg, s3 = fault_stack
    kills = 0
    with Load(stack) as load:
        wait_for(lambda: len(load.accepted) >= 10, 30, "load under way")
        for _ in range(2):
            stack.kill_consumers()
            kills += 1
            time.sleep(3)
        # Each outage lasts several lease and sweep periods (leases are 3 s here):
        # long enough for every reconnect and retry path to run, short enough for
        # the suite. (Celery 5.7's crash on a lost broker came within a second.)
        stack.redis.stop()  # same port, empty when back: every message is gone
        time.sleep(5)
        stack.redis.start()
        time.sleep(3)
        stack.kill_consumers()
        kills += 1
        pg.stop()
        time.sleep(5)
        pg.start()
        time.sleep(3)
        s3.stop()
        time.sleep(4)
        s3.start()
        time.sleep(2)
        stack.kill_consumers()
        kills += 1
        time.sleep(3)
    accepted = dict(load.accepted)
    assert len(accepted) > 100

    def all_finished() -> bool:
        rows = _query(stack, "SELECT status FROM job WHERE id = ANY(:ids)", ids=list(accepted))
        return len(rows) == len(accepted) and all(r[0] in FINISHED for r in rows)

    wait_for(all_finished, 120, "every accepted job to finish", interval=1)

    jobs = {
        r[0]: r
        for r in _query(
            stack,
            "SELECT id, status, attempts, error_code FROM job WHERE id = ANY(:ids)",
            ids=list(accepted),
        )
    }
    images = _query(
        stack,
        'SELECT job_id, "index", storage_key FROM image WHERE job_id = ANY(:ids)',
        ids=list(accepted),
    )
    per_job: dict[str, list[int]] = {}
    for job_id, index, _key in images:
        per_job.setdefault(job_id, []).append(index)
    s3_client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    stored: set[str] = set()
    try:
        for page in s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=stack.env["IMAGEGEN_S3_BUCKET"]
        ):
            stored |= {obj["Key"] for obj in page.get("Contents", [])}
    finally:
        s3_client.close()
    failures = []
    for job_id, (prompt, n) in accepted.items():
        _id, status, attempts, error = jobs[job_id]
        if status != "succeeded":
            failures.append((job_id, status, attempts, error))
            continue
        assert sorted(per_job.get(job_id, [])) == list(range(n)), job_id  # exactly n
        calls = stack.upstream.counts[prompt]
        assert 1 <= calls <= attempts <= MAX_ATTEMPTS, (job_id, calls, attempts)
    assert not failures, failures
    # The consumers rode the broker outage out themselves (restarts were for kills).
    assert "Unrecoverable error" not in stack.worker.log()
    keys = {key for _, _, key in images}
    assert keys <= stored, "every recorded image is in storage"
    print(
        f"faults: {kills} consumer kills, Redis 20 s, PostgreSQL 15 s, S3 15 s; "
        f"{len(accepted)} accepted, {load.refused} refused, 0 lost, 0 duplicated, "
        f"attempts max {max(j[2] for j in jobs.values())}"
    )


def test_a_job_out_of_attempts_fails_without_calling_the_provider(
    fault_stack: tuple[Stack, PostgresCluster, S3Server],
) -> None:
    stack = fault_stack[0]
    job = stack.submit("[spent] attempts", model="parked")
    # As if five workers in a row had died holding it: its lease has run out.
    _query(
        stack,
        "UPDATE job SET model = 'fake-fast', queue = 'default', status = 'running', "
        "attempts = :a, lease_token = 'gone', "
        "lease_expires_at = now() - interval '1 minute' WHERE id = :id",
        a=MAX_ATTEMPTS,
        id=job["id"],
    )
    done = stack.wait_job(job["id"], timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "max_attempts_exceeded"
    assert str(MAX_ATTEMPTS) in done["error"]["message"]
    assert done["attempts"] == MAX_ATTEMPTS
    assert stack.upstream.calls_for("[spent]") == []


def test_a_result_the_database_refuses_fails_the_job_once(
    fault_stack: tuple[Stack, PostgresCluster, S3Server],
) -> None:
    """Recording fails for good (here a constraint refuses the upstream's revised
    prompt): the job ends failed on its first attempt; the provider is paid once."""
    stack = fault_stack[0]
    _query(
        stack,
        "ALTER TABLE image ADD CONSTRAINT refuse_marked "
        "CHECK (revised_prompt NOT LIKE '%[refuse-record]%')",
    )
    with stack.client() as client:
        resp = client.post(
            "/v1/images/generations",
            json={"model": "fake-fast", "prompt": "[refuse-record] poison", "size": "64x64"},
        )
    assert resp.status_code == 500, resp.text
    assert resp.json()["error"]["code"] == "internal_error"
    [(job_id, status, attempts, code)] = _query(
        stack,
        "SELECT id, status, attempts, error_code FROM job WHERE request->>'prompt' = "
        "'[refuse-record] poison'",
    )
    assert (status, attempts, code) == ("failed", 1, "internal_error")
    time.sleep(stack_lease_seconds(stack) * 2)  # past a lease: no second attempt runs
    assert len(stack.upstream.calls_for("[refuse-record]")) == 1
    assert _query(stack, "SELECT attempts FROM job WHERE id = :id", id=job_id)[0][0] == 1


def stack_lease_seconds(stack: Stack) -> float:
    return float(stack.env["IMAGEGEN_JOB_LEASE_SECONDS"])
