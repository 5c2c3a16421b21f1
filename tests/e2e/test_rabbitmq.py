"""RabbitMQ as the broker (issue 28): the e2e core on one stack whose broker is a
RabbitMQ node of the test's own (tests/support/rabbitmq.py), Redis serving the rest.
Each behaviour in short; the long forms run on Redis (test_jobs, test_batches,
test_webhooks, test_resilience)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from tests.support.processes import wait_for
from tests.support.rabbitmq import RabbitMQServer
from tests.support.receiver import Receiver
from tests.support.stack import Stack


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    # Not skipped when rabbitmq-server is missing: it fails, naming the package.
    server = RabbitMQServer(Path(tmp_path_factory.mktemp("rabbitmq"))).start(wait=False)
    yield server
    server.remove()


@pytest.fixture(scope="module")
def rstack(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, rabbit: RabbitMQServer
) -> Iterator[Stack]:
    # The node boots (about 3 s) while the stack migrates and starts: the worker
    # waits for its broker as it would in a deployment.
    s = Stack(Path(tmp_path_factory.mktemp("rabbit-stack")), s3_endpoint, broker_url=rabbit.url)
    rabbit.wait_ready()
    yield s
    s.close()


@pytest.fixture
def client(rstack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=rstack.key_a, base_url=f"{rstack.base_url}/v1", max_retries=0
    ) as client:
        yield client


def image_keys(stack: Stack, job_id: str) -> list[tuple[int, str]]:
    engine = sa.create_engine(stack.database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text('SELECT "index", storage_key FROM image WHERE job_id = :j'), {"j": job_id}
            ).all()
    finally:
        engine.dispose()
    return [(r[0], r[1]) for r in rows]


def test_each_consumer_runs_under_a_node_name_of_its_own(rstack: Stack) -> None:
    """Both consumers of one ``imagegen worker`` stay up: with one node name the
    second died at start (ResourceLocked on the exclusive pidbox queue), for ever."""
    wait_for(lambda: len(re.findall(r" ready\.", rstack.worker.log())) >= 2, 60, "consumers")
    log = rstack.worker.log()
    names = re.findall(r"\[celery\.apps\.worker\] (\S+@\S+) ready\.", log)
    assert len(names) == len(set(names)) == 2, names
    assert "ResourceLocked" not in log
    assert "starting it again" not in log  # the supervisor restarted nothing
    with rstack.client() as http:
        ready = http.get("/readyz").json()
    assert ready == {"status": "ready", "checks": dict.fromkeys(ready["checks"], "ok")}


def test_sync_and_async_generations(rstack: Stack, client: openai.OpenAI) -> None:
    result = client.images.generate(model="procedural", prompt="a hare", size="64x64")
    assert result.data is not None
    assert result.data[0].url
    assert httpx.get(result.data[0].url).status_code == 200

    async def three_at_once() -> list[int]:
        async with openai.AsyncOpenAI(
            api_key=rstack.key_a, base_url=f"{rstack.base_url}/v1", max_retries=0
        ) as aclient:
            answers = await asyncio.gather(
                *(
                    aclient.images.generate(model="fake-n1", prompt=f"hare {i}", size="64x64", n=2)
                    for i in range(3)
                )
            )
        return [len(a.data or []) for a in answers]

    assert asyncio.run(three_at_once()) == [2, 2, 2]
    job = rstack.submit("an async hare")  # Prefer: respond-async
    assert job["status"] == "queued"
    done = rstack.wait_job(job["id"], timeout=30)
    assert done["status"] == "succeeded"
    assert len(done["result"]["data"]) == 1


def test_cancel_queued_and_running_jobs(rstack: Stack) -> None:
    parked = rstack.submit("never run", model="parked")  # a queue no worker consumes
    running = rstack.submit("cancel me [slow=1.5]", model="fake-fast")
    with rstack.client() as http:
        assert http.post(f"/v1/images/jobs/{parked['id']}/cancel").json()["status"] == "canceled"
        wait_for(lambda: rstack.upstream.calls_for("cancel me"), 10, "the upstream call")
        assert http.post(f"/v1/images/jobs/{running['id']}/cancel").json()["status"] == "canceled"
    time.sleep(2)  # past the upstream's answer, which is discarded
    for job in (parked, running):
        final = rstack.wait_job(job["id"])
        assert final["status"] == "canceled"
        assert "result" not in final
        assert not image_keys(rstack, job["id"])
    assert rstack.wait_job(parked["id"])["attempts"] == 0


def test_small_batch(rstack: Stack, client: openai.OpenAI) -> None:
    """Batch lines go through their own queue and consumer (``batch``)."""
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/images/generations",
            "body": {"model": "procedural", "prompt": cid, "size": size},
        }
        for cid, size in (("fox", "64x64"), ("owl", "64x64"), ("bad", "13x13"))
    ]
    content = "\n".join(json.dumps(x) for x in lines).encode()
    file = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    wait_for(
        lambda: client.batches.retrieve(batch.id).status in ("completed", "failed"),
        30,
        "the batch",
        interval=0.3,
    )
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert done.output_file_id
    output = client.files.content(done.output_file_id).text.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in output) == ["fox", "owl"]


def test_webhook_delivered_and_signed(rstack: Stack) -> None:
    key = rstack.create_key("rabbit-hooks")
    receiver = Receiver().start()
    try:
        with rstack.client(key) as http:
            endpoint = http.post(
                "/v1/webhooks/endpoints",
                json={"url": receiver.url(), "events": ["job.succeeded"]},
            ).json()
        job = rstack.submit("hooked hare", key=key)
        [request] = receiver.wait_requests(1)
    finally:
        receiver.stop()
    event = Webhook(endpoint["secret"]).verify(request["body"], request["headers"])
    assert event["type"] == "job.succeeded"
    assert event["data"]["id"] == job["id"]


def test_consumer_killed_mid_job_completes_exactly_once(rstack: Stack) -> None:
    """RabbitMQ gives the dead consumer's unacked message back at once; the job's SQL
    lease, not the broker, decides that it runs again only once that lease expired."""
    job = rstack.submit("[slow=2] survive a kill", model="fake-fast", n=3)
    wait_for(lambda: rstack.upstream.calls_for("survive a kill"), 15, "the upstream call")
    rstack.kill_consumers()  # SIGKILL: no ack; the supervisor starts new ones
    done = rstack.wait_job(job["id"], timeout=45)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 2
    assert len(done["result"]["data"]) == 3
    rows = image_keys(rstack, job["id"])
    assert sorted(index for index, _ in rows) == [0, 1, 2]
    assert len({key for _, key in rows}) == 3


def test_broker_restart_loses_no_accepted_job(rstack: Stack, rabbit: RabbitMQServer) -> None:
    """With the broker down the API still accepts (sync and async); once it is back
    every job completes, once."""
    rabbit.stop()
    with rstack.client() as http:
        asked = time.monotonic()
        ready = http.get("/readyz")
        assert time.monotonic() - asked < 1.5  # one try, no retry interval slept
    assert ready.status_code == 503
    assert ready.json()["checks"]["broker"].startswith("OperationalError"), ready.json()
    answers: list[httpx.Response] = []

    def sync_request() -> None:
        with rstack.client() as http:
            answers.append(
                http.post(
                    "/v1/images/generations",
                    json={"model": "procedural", "prompt": "sync in outage", "size": "64x64"},
                )
            )

    waiting = threading.Thread(target=sync_request)
    waiting.start()
    accepted = [rstack.submit(f"outage {i}")["id"] for i in range(3)]
    rabbit.start()
    for job_id in accepted:
        done = rstack.wait_job(job_id, timeout=45)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1
    waiting.join(45)
    assert [r.status_code for r in answers] == [200]
    assert len(answers[0].json()["data"]) == 1
