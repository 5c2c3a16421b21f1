"""Many upstreams behind one model (issue 26, first part): a model's deployments, each
a fake OpenAI-compatible upstream of its own, tried in turn when one fails; fallback
models after them, skipped where they cannot take the request; the job records what
served it (``served_by``) and what it cost (``cost_usd``), through the unmodified
`openai` package and the job API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from shared.jobs.routing import Cooldowns, Target
from shared.jobs.schemas import GenerationParams
from shared.registry import PROCEDURAL
from tests.support.fake_upstream import FakeUpstream
from tests.support.processes import RedisServer, cmdline
from tests.support.stack import Stack

PARAMS = GenerationParams(model="spread", prompt="p", n=1, size="64x64")


def _deployment(upstream: FakeUpstream, name: str, weight: float = 1) -> dict[str, Any]:
    return {
        "id": name,
        "provider": "openai",
        "base_url": upstream.base_url,
        "api_key_env": "FAKE_UPSTREAM_KEY",
        "upstream_model": "fake-fast",
        "weight": weight,
    }


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, FakeUpstream]]:
    fakes = {
        name: FakeUpstream().start() for name in ("a", "b", "broken", "cool", "steady", "paced")
    }
    fakes["paced"].images_per_minute = 120  # OpenAI's 429 past it
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.fixture(scope="module")
def routed(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, upstreams: dict[str, FakeUpstream]
) -> Iterator[Stack]:
    caps = {"sizes": ["64x64", "256x256"], "max_n": 4}
    models: list[dict[str, Any]] = [
        {  # one deployment declaring its upstream's limit: jobs wait for room
            "name": "paced",
            "capabilities": caps,
            "deployments": [
                {**_deployment(upstreams["paced"], "dep-paced"), "images_per_minute": 120}
            ],
        },
        {  # issue 26's form: no provider on the entry, its deployments say it
            "name": "spread",
            "capabilities": caps,
            "price": {"per_image": 0.04, "per_image_by": {"256x256": 0.02}},
            # The heavy one first: it fails, and the attempt moves on to "b".
            "deployments": [
                _deployment(upstreams["a"], "dep-a", weight=1000),
                _deployment(upstreams["b"], "dep-b"),
            ],
        },
        {
            "name": "falls-back",
            "capabilities": caps,
            "deployments": [_deployment(upstreams["broken"], "dep-broken")],
            # "tiny-only" cannot take 64x64: skipped; procedural serves.
            "fallbacks": ["tiny-only", "procedural"],
        },
        {  # a deployment that refuses (content policy): nothing falls back
            "name": "refuses",
            "capabilities": caps,
            "deployments": [_deployment(upstreams["b"], "dep-b")],
            "fallbacks": ["procedural"],
        },
        {  # its own cooldown keys: one process cools "dep-cool", the other skips it
            "name": "shared-cooldown",
            "capabilities": caps,
            "deployments": [
                _deployment(upstreams["cool"], "dep-cool", weight=1000),
                _deployment(upstreams["steady"], "dep-steady"),
            ],
        },
        {
            "name": "tiny-only",
            "provider": "procedural",
            "capabilities": {"sizes": ["32x32"], "max_n": 1},
        },
    ]
    stack = Stack(tmp_path_factory.mktemp("routing"), s3_endpoint, extra_models=models)
    try:
        yield stack
    finally:
        stack.close()


def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as client:
        resp = client.get(f"/v1/images/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_a_failing_deployment_hands_the_call_to_the_next(
    routed: Stack, upstreams: dict[str, FakeUpstream]
) -> None:
    upstreams["a"].mode = "429"
    try:
        with openai.OpenAI(
            api_key=routed.key_a, base_url=f"{routed.base_url}/v1", max_retries=0
        ) as client:
            raw = client.images.with_raw_response.generate(
                model="spread", prompt="spread over two keys", size="256x256", n=2
            )
    finally:
        upstreams["a"].mode = None
    assert raw.headers["x-imagegen-cost-usd"] == "0.040000"
    result = raw.parse()
    assert result.data is not None
    assert len(result.data) == 2
    assert upstreams["a"].calls_for("spread over two keys")  # tried first, 429
    assert upstreams["b"].calls_for("spread over two keys")  # then served
    job = _job(routed, _last_job_id(routed))
    assert job["served_by"] == {"model": "spread", "deployment": "dep-b"}
    assert job["cost_usd"] == pytest.approx(0.04)  # 2 x 0.02 at 256x256


def test_a_cooling_deployment_is_not_called_again_meanwhile(
    routed: Stack, upstreams: dict[str, FakeUpstream]
) -> None:
    upstreams["a"].mode = "429"  # Retry-After: 30
    try:
        for index in range(3):
            job = routed.submit(f"cooling {index}", model="spread")
            done = routed.wait_job(job["id"])
            assert done["status"] == "succeeded"
            assert done["served_by"]["deployment"] == "dep-b"
            assert done["cost_usd"] == pytest.approx(0.04)  # 1 x per_image
    finally:
        upstreams["a"].mode = None
    prompts = [str(c["body"].get("prompt", "")) for c in upstreams["a"].calls]
    called = [p for p in prompts if p.startswith("cooling")]
    assert len(called) <= 1  # one 429, then it cools down (one worker process here)


def test_usage_sums_the_jobs_costs(routed: Stack) -> None:
    with routed.client() as client:
        jobs = client.get("/v1/images/jobs", params={"limit": 100}).json()["data"]
        report = client.get("/v1/usage").json()
    spent = sum(job.get("cost_usd", 0) for job in jobs if job["model"] == "spread")
    assert spent > 0
    (bucket,) = [b for b in report["data"] if b["model"] == "spread"]
    assert bucket["cost_usd"] == pytest.approx(spent)
    assert report["totals"]["cost_usd"] == pytest.approx(spent)
    # The CLI shows the same (imagegen usage).
    args = ["--base-url", routed.base_url, "--api-key", routed.key_a]
    shown = subprocess.run(
        [sys.executable, "-m", "cli", "usage", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"{spent:.4f}" in shown
    as_json = subprocess.run(
        [sys.executable, "-m", "cli", "usage", "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(as_json)["totals"]["cost_usd"] == pytest.approx(spent)


def test_a_model_whose_deployments_fail_falls_back_to_one_that_can_take_it(
    routed: Stack, upstreams: dict[str, FakeUpstream]
) -> None:
    upstreams["broken"].mode = "empty"  # 200 without an image
    job = routed.submit("fall back", model="falls-back")
    done = routed.wait_job(job["id"])
    assert done["status"] == "succeeded", done
    assert done["served_by"] == {"model": "procedural", "deployment": "procedural"}
    assert "cost_usd" not in done  # procedural has no price
    assert upstreams["broken"].calls_for("fall back")


def test_a_refusal_does_not_fall_back(routed: Stack, upstreams: dict[str, FakeUpstream]) -> None:
    job = routed.submit("[content-policy] no fallback", model="refuses")
    done = routed.wait_job(job["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "content_policy_violation"
    assert "served_by" not in done


def _last_job_id(stack: Stack) -> str:
    with httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.key_a}"}
    ) as client:
        page = client.get("/v1/images/jobs", params={"limit": 1}).json()
    job_id: str = page["data"][0]["id"]
    return job_id


def test_a_cooldown_is_seen_by_every_process_on_the_same_redis(tmp_path: Path) -> None:
    """Two workers' cooldowns (one per process) over one real Redis: what one puts
    in cooldown the other skips, until it expires."""
    server = RedisServer(tmp_path).start()
    try:
        first = Cooldowns(redis.Redis.from_url(server.url))
        second = Cooldowns(redis.Redis.from_url(server.url))
        target = Target(PROCEDURAL, PARAMS, "spread", "dep-a", cools=True)
        first.cool(target, 0.5)
        assert second.cooling("spread", "dep-a")
        assert not second.cooling("spread", "dep-b")
        time.sleep(0.7)
        assert not second.cooling("spread", "dep-a")
        # One of a model's own implicit deployment never cools: nowhere else to go.
        first.cool(Target(PROCEDURAL, PARAMS, "procedural", "procedural", cools=False), 30)
        assert not second.cooling("procedural", "procedural")
    finally:
        server.stop()


def test_a_cooldown_one_worker_process_wrote_is_honoured_by_the_other(
    routed: Stack, upstreams: dict[str, FakeUpstream]
) -> None:
    """The stack's worker runs two consumer processes: interactive jobs in one, batch
    lines in the other (worker/supervisor.py), each with its own in-process
    cooldowns; Redis is all they share. What Redis guarantees: a process writes the
    cooldown right after the 429, before its job moves on, and from then on no
    attempt that chooses its targets, in any process, calls that deployment until
    it expires (Retry-After: 30 here). Attempts that chose theirs before the write
    may still call it: the first job is waited for before the batch starts, so the
    deployment is called exactly once."""
    consumers = [cmdline(pid) for pid in routed.consumers()]
    queues = sorted(argv[argv.index("--queues") + 1] for argv in consumers)
    assert queues == ["batch", "default,webhooks"]  # two processes, one queue each
    cool, steady = upstreams["cool"], upstreams["steady"]
    cool.mode = "429"  # Retry-After: 30
    try:
        # The interactive consumer meets the 429 (dep-cool, weighing 1000 to 1, is
        # tried first all but once in a thousand) and cools it down.
        for attempt in range(5):
            job = routed.submit(f"cool first {attempt}", model="shared-cooldown")
            done = routed.wait_job(job["id"])
            assert done["status"] == "succeeded", done
            assert done["served_by"]["deployment"] == "dep-steady"
            if cool.rate_limited:
                break
        assert cool.rate_limited == 1
        lines = [f"cool line {index}" for index in range(6)]
        with routed.client() as client:
            resp = client.post(
                "/v1/images/batches",
                json={"model": "shared-cooldown", "size": "64x64", "prompts": lines},
            )
            assert resp.status_code == 200, resp.text
            batch_id = resp.json()["id"]
            deadline = time.monotonic() + 60
            while (batch := client.get(f"/v1/images/batches/{batch_id}").json())["status"] not in (
                "completed",
                "failed",
            ):
                assert time.monotonic() < deadline, batch
                time.sleep(0.1)
    finally:
        cool.mode = None
    assert batch["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    # The batch consumer never called dep-cool: every line went to dep-steady.
    assert len(cool.calls) == 1
    assert cool.rate_limited == 1
    assert all(len(steady.calls_for(line)) == 1 for line in lines)


def test_jobs_wait_for_room_at_a_limited_deployment_instead_of_meeting_its_429(
    routed: Stack, upstreams: dict[str, FakeUpstream]
) -> None:
    """A deployment declaring 120 images a minute, its upstream answering 429 past
    that: three interactive jobs of four images each (two seconds' worth each) and a
    batch of two one-image lines, all at once. None is refused upstream; the jobs
    whose turn is more than two seconds off wait queued, saying why, without
    spending an attempt, and all succeed."""
    paced = upstreams["paced"]
    started = time.monotonic()
    jobs = [routed.submit(f"paced job {index}", model="paced", n=4) for index in range(3)]
    with routed.client() as client:
        resp = client.post(
            "/v1/images/batches",
            json={
                "model": "paced",
                "size": "64x64",
                "prompts": [f"paced line {index}" for index in range(2)],
            },
        )
        assert resp.status_code == 200, resp.text
        batch_id = resp.json()["id"]
        details: set[str] = set()
        deadline = time.monotonic() + 60
        while (batch := client.get(f"/v1/images/batches/{batch_id}").json())["status"] not in (
            "completed",
            "failed",
        ) or any(_job(routed, j["id"])["status"] in ("queued", "running") for j in jobs):
            assert time.monotonic() < deadline, batch
            for job in jobs:
                seen = _job(routed, job["id"])
                if seen["status"] == "queued" and seen.get("status_detail"):
                    details.add(seen["status_detail"])
            time.sleep(0.1)
    took = time.monotonic() - started
    done = [_job(routed, job["id"]) for job in jobs]
    assert [job["status"] for job in done] == ["succeeded"] * 3
    assert all(len(job["result"]["data"]) == 4 for job in done)
    assert all(job["attempts"] == 1 for job in done)  # waiting spends no attempt
    assert batch["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert paced.rate_limited == 0  # every call inside the upstream's limit
    assert len(paced.calls) == 3 + 2  # and none repeated
    assert took > 14 / 2 - 2.5  # 14 images at 2 a second, less the first call's burst
    assert any(d.startswith("waiting for capacity: every deployment of 'paced'") for d in details)


def test_a_batch_says_what_its_lines_cost(routed: Stack) -> None:
    with routed.client() as client:
        resp = client.post(
            "/v1/images/batches",
            json={"model": "spread", "size": "64x64", "prompts": ["one", "two", "three"]},
        )
        assert resp.status_code == 200, resp.text
        batch_id = resp.json()["id"]
        deadline = time.monotonic() + 60
        while (batch := client.get(f"/v1/images/batches/{batch_id}").json())["status"] not in (
            "completed",
            "failed",
        ):
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
    assert batch["request_counts"]["completed"] == 3
    assert batch["cost_usd"] == pytest.approx(3 * 0.04)


def test_the_admin_api_shows_which_deployments_are_cooling(
    routed: Stack, upstreams: dict[str, FakeUpstream]
) -> None:
    upstreams["a"].mode = "429"  # Retry-After: 30
    try:
        job = routed.submit("health", model="spread")
        assert routed.wait_job(job["id"])["status"] == "succeeded"
    finally:
        upstreams["a"].mode = None
    with httpx.Client(
        base_url=routed.base_url, headers={"Authorization": "Bearer sk-admin-test"}
    ) as client:
        resp = client.get("/v1/admin/deployments")
    assert resp.status_code == 200, resp.text
    rows = {(r["model"], r["deployment"]): r for r in resp.json()["data"]}
    assert rows[("spread", "dep-a")]["cooling"] is True
    assert rows[("spread", "dep-b")]["cooling"] is False
    assert rows[("spread", "dep-a")]["weight"] == 1000
    assert ("fake-fast", "fake-fast") in rows  # a model without deployments: its own one
    # The CLI shows the same (imagegen deployments).
    shown = subprocess.run(
        [sys.executable, "-m", "cli", "deployments", "--base-url", routed.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "IMAGEGEN_ADMIN_API_KEY": "sk-admin-test", "COLUMNS": "200"},
    ).stdout
    lines = {tuple(line.split()[:2]): line.split()[2:] for line in shown.splitlines()}
    assert lines[("spread", "dep-a")] == ["1000", "-", "-", "cooling", "down"]
    assert lines[("spread", "dep-b")] == ["1", "-", "-", "healthy"]


def test_metrics_count_each_deployments_calls_errors_and_cooldowns(
    routed: Stack, upstreams: dict[str, FakeUpstream]
) -> None:
    upstreams["a"].mode = "429"  # if "dep-a" is not cooling already, it is now
    try:
        job = routed.submit("metrics", model="spread")
        assert routed.wait_job(job["id"])["status"] == "succeeded"
    finally:
        upstreams["a"].mode = None
    text = httpx.get(
        f"{routed.base_url}/metrics", headers={"Authorization": "Bearer sk-admin-test"}
    ).text

    def value(name: str, **labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    calls = "imagegen_deployment_calls_total"
    assert value(calls, model="spread", deployment="dep-b", outcome="ok") >= 1
    assert value(calls, model="spread", deployment="dep-a", outcome="upstream_rate_limited") >= 1
    assert value("imagegen_deployment_cooldowns_total", model="spread", deployment="dep-a") >= 1
    assert value("imagegen_deployment_call_duration_seconds_count", deployment="dep-b") >= 1
