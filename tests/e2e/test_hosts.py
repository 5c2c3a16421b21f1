"""The service on several hosts (issue 28): whatever one process keeps to itself
breaks when a second host appears, so here every part runs on a host of its own,
each a Linux network namespace (tests/support/netns.py): a data host (Redis,
PostgreSQL, S3, the fake upstream), two API hosts, two worker hosts of the I/O
queue, one of the batch and webhook queues, and a client host. Requests are
spread over both API hosts; then a worker host is cut off (its interface down)
and another killed mid-run, and an API host killed under a client that retries
with its Idempotency-Key against the other.

Needs root (network namespaces): skipped, saying why, where the kernel refuses.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import netns
from tests.support.cluster import UPSTREAM_URL, Cluster
from tests.support.processes import wait_for
from tests.support.receiver import Receiver
from tests.support.stack import FINISHED

GENERATE = "/v1/images/generations"
ASYNC = {"Prefer": "respond-async"}
MAX_ATTEMPTS = 5
# A deployment taking two calls at once, whichever worker hosts make them.
CAPPED = {
    "name": "capped",
    "capabilities": {"sizes": ["64x64"], "max_n": 1},
    "deployments": [
        {
            "id": "capped-a",
            "provider": "openai",
            "base_url": UPSTREAM_URL,
            "api_key_env": "FAKE_UPSTREAM_KEY",
            "upstream_model": "capped",
            "max_concurrency": 2,
        }
    ],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    hosts = Cluster(
        Path(tmp_path_factory.mktemp("hosts")),
        env={"IMAGEGEN_JOB_MAX_ATTEMPTS": str(MAX_ATTEMPTS)},
        extra_models=[CAPPED],
    )
    try:
        yield hosts
    finally:
        hosts.close()


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-fast", "prompt": prompt, "size": "64x64", **extra}


def events_of(api: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    with api.stream("GET", f"/v1/images/jobs/{job_id}/events", timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        name = None
        for line in resp.iter_lines():  # ends when the server closes the stream
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                assert name is not None
                events.append((name, json.loads(line[len("data: ") :])))
    return events


def streamed(api: httpx.Client, request: dict[str, Any]) -> list[str]:
    """The event types of a streamed generation (OpenAI's image events)."""
    request = {**request, "stream": True, "partial_images": 2}
    with api.stream("POST", GENERATE, json=request) as resp:
        assert resp.status_code == 200, resp.read()
        return [
            json.loads(line[len("data: ") :])["type"]
            for line in resp.iter_lines()
            if line.startswith("data: ")
        ]


def test_requests_spread_over_both_api_hosts(cluster: Cluster) -> None:
    """Sync, streamed, async, SSE, a webhook, a batch and an Idempotency-Key, each
    asked of one API host and answered or continued by the other or a worker host."""
    receiver = cluster.client.run(lambda: Receiver(port=9100, host=cluster.client.address).start())

    def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with cluster.http("api1") as one, cluster.http("api2") as two:
            # Sync: each API host waits for a worker host's answer (Redis pub/sub).
            seen["sync"] = [
                api.post(GENERATE, json=body(f"sync on {i}")) for i, api in enumerate((one, two))
            ]
            # Its image, stored by the worker host, from the data host's S3.
            seen["image"] = httpx.get(seen["sync"][0].json()["data"][0]["url"], timeout=10)
            # Streamed: the worker host's partial images reach the API host that streams.
            seen["streamed"] = streamed(
                two, {"model": "procedural", "prompt": "streamed", "size": "64x64"}
            )
            # A job accepted by one host, its events streamed and its state read by
            # the other, its webhook delivered by the webhook host to the client host.
            job = one.post(
                GENERATE,
                headers=ASYNC,
                json=body(
                    "async [slow=1]",
                    webhook_url=receiver.url("/job"),
                    webhook_events=["job.succeeded"],
                ),
            ).json()
            seen["job"] = job
            seen["events"] = events_of(two, job["id"])
            seen["polled"] = two.get(f"/v1/images/jobs/{job['id']}").json()
            # The same Idempotency-Key at both hosts: one job.
            keyed = body("keyed once")
            headers = {**ASYNC, "Idempotency-Key": "hosts-key-1"}
            seen["keyed"] = [
                api.post(GENERATE, headers=headers, json=keyed).json() for api in (one, two)
            ]
            # A batch accepted by one host, read on the other until it completes.
            batch = two.post(
                "/v1/images/batches",
                json={"prompts": [f"batch line {i}" for i in range(4)], **body("")},
            )
            assert batch.status_code == 200, batch.text
            batch_id = batch.json()["id"]
            wait_for(
                lambda: (
                    one.get(f"/v1/images/batches/{batch_id}").json()["status"]
                    in ("completed", "failed", "cancelled")
                ),
                30,
                "the batch",
                interval=0.2,
            )
            seen["batch"] = one.get(f"/v1/images/batches/{batch_id}").json()
        return seen

    try:
        seen = cluster.client.run(scenario)
        hooks = receiver.wait_requests(1, timeout=20)
    finally:
        receiver.stop()
    for resp in seen["sync"]:
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["data"]) == 1
    assert seen["image"].status_code == 200
    assert seen["image"].content.startswith(b"\x89PNG")
    assert seen["streamed"] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    statuses = [data["status"] for _, data in seen["events"]]
    assert statuses[-1] == "succeeded"
    assert len(statuses) >= 2, "a change reached the other API host while it streamed"
    assert [name for name, _ in seen["events"]] == [f"job.{s}" for s in statuses]
    assert seen["polled"]["status"] == "succeeded"
    assert seen["polled"]["id"] == seen["job"]["id"]
    first, second = seen["keyed"]
    assert first["id"] == second["id"]
    assert len(cluster.query("SELECT id FROM job WHERE request->>'prompt' = 'keyed once'")) == 1
    assert seen["batch"]["status"] == "completed", seen["batch"]
    assert seen["batch"]["request_counts"]["completed"] == 4
    [hook] = hooks
    assert hook["path"] == "/job"
    assert "webhook-signature" in hook["headers"]
    event = json.loads(hook["body"])
    assert (event["type"], event["data"]["id"]) == ("job.succeeded", seen["job"]["id"])


def test_what_a_process_caches_or_counts_holds_on_every_host(cluster: Cluster) -> None:
    """A key's rate limit counts its requests at both API hosts together, and a
    deployment's max_concurrency the calls of both worker hosts; a key revoked at
    one host is refused at the other (which had it cached) as soon as the message
    reaches it; a webhook endpoint made at one host receives the events of a job
    that a worker host records, though that host had cached the project as
    having none."""
    receiver = cluster.client.run(lambda: Receiver(port=9101, host=cluster.client.address).start())
    admin = {"Authorization": "Bearer sk-admin-test"}
    upstream = cluster.upstream
    assert upstream is not None

    def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with (
            httpx.Client(base_url=cluster.api_url("api1"), headers=admin) as one,
            httpx.Client(base_url=cluster.api_url("api2"), headers=admin) as two,
        ):
            made = one.post(
                "/v1/admin/projects", json={"name": "hosts-limited", "key_requests_per_minute": 4}
            )
            assert made.status_code == 200, made.text
            limited = one.post("/v1/admin/keys", json={"project": "hosts-limited"}).json()
            watched = one.post("/v1/admin/keys", json={"project": "hosts-hooks"}).json()
            bearer = {"Authorization": f"Bearer {limited['key']}"}
            # The limit counts in fixed windows of a minute: all six in one window.
            if (left := 60 - time.time() % 60) < 5:
                time.sleep(left + 0.1)
            seen["limited"] = [
                api.get("/v1/images/jobs", headers=bearer).status_code
                for api in (one, two, one, two, one, two)
            ]
            # Revoked at one host, known (cached) at the other.
            hooks = {"Authorization": f"Bearer {watched['key']}"}
            assert two.get("/v1/images/jobs", headers=hooks).status_code == 200
            # A job first: the worker hosts cache the project's (no) endpoints.
            assert two.post(GENERATE, headers=hooks, json=body("before")).status_code == 200
            endpoint = two.post(
                "/v1/webhooks/endpoints",
                headers=hooks,
                json={"url": receiver.url("/endpoint"), "events": ["job.succeeded"]},
            )
            assert endpoint.status_code == 200, endpoint.text
            after = one.post(GENERATE, headers={**hooks, **ASYNC}, json=body("after")).json()
            seen["after"] = after["id"]
            revoked = one.post(f"/v1/admin/keys/{watched['id']}/revoke")
            assert revoked.status_code == 200, revoked.text
            # The other host drops its cached key when the revocation's message
            # reaches it (Redis pub/sub), a moment after the answer here: without
            # that message it would serve it for a minute (its cache's backstop).
            wait_for(
                lambda: two.get("/v1/images/jobs", headers=hooks).status_code == 401,
                2,
                "the revoked key refused at the other host",
                interval=0.01,
            )
        wait_for(lambda: cluster.finished([seen["after"]]), 20, "the job after", interval=0.1)
        upstream.max_in_flight = 0  # nothing else calls it from here on
        with cluster.http("api1") as one, cluster.http("api2") as two:
            seen["capped"] = [
                api.post(
                    GENERATE, headers=ASYNC, json=body(f"[slow=0.5] capped {i}", model="capped")
                ).json()["id"]
                for i, api in zip(range(8), itertools.cycle((one, two)), strict=False)
            ]
        return seen

    try:
        seen = cluster.client.run(scenario)
        [hook] = receiver.wait_requests(1, timeout=20)
    finally:
        receiver.stop()
    wait_for(lambda: cluster.finished(seen["capped"]), 30, "the capped jobs", interval=0.2)
    rows = cluster.query("SELECT status FROM job WHERE id = ANY(:ids)", ids=seen["capped"])
    assert {status for (status,) in rows} == {"succeeded"}
    # Eight calls wanting room on two hosts at once: a cap kept per host or per
    # process would let four through.
    assert upstream.max_in_flight <= 2
    assert seen["limited"] == [200, 200, 200, 200, 429, 429]
    assert hook["path"] == "/endpoint"
    assert json.loads(hook["body"])["data"]["id"] == seen["after"]


class Load:
    """Async jobs from the client host, alternately to each API host, until
    stopped; keeps what was accepted."""

    def __init__(self, cluster: Cluster, apis: list[str]) -> None:
        self.cluster = cluster
        self.apis = apis
        self.accepted: dict[str, tuple[str, int]] = {}  # job id -> (prompt, n)
        self.refused = 0
        self._stop = threading.Event()
        self._done = cluster.client.pool.submit(self._run)

    def stop(self) -> None:
        self._stop.set()
        self._done.result(30)

    def _run(self) -> None:
        clients = [self.cluster.http(role, timeout=10) for role in self.apis]
        try:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                n = 1 + i % 2
                prompt = f"[slow=0.8] spread {i}"
                try:
                    resp = clients[i % len(clients)].post(
                        GENERATE, headers=ASYNC, json=body(prompt, n=n)
                    )
                    assert resp.status_code == 202, resp.text
                    self.accepted[resp.json()["id"]] = (prompt, n)
                except httpx.TransportError:
                    self.refused += 1
                self._stop.wait(0.1)
        finally:
            for client in clients:
                client.close()


def test_a_worker_host_cut_off_and_another_killed_lose_and_repeat_nothing(
    cluster: Cluster,
) -> None:
    upstream = cluster.upstream
    assert upstream is not None
    cut, killed = cluster["work1"], cluster["work2"]
    load = Load(cluster, ["api1", "api2"])
    try:
        wait_for(lambda: len(load.accepted) >= 10, 20, "load under way")
        cut.cut_off()  # mid-run: it holds jobs it can neither finish nor give back
        time.sleep(4)  # past its jobs' leases (3 s): the other host takes them
        cut.reconnect()
        time.sleep(2)
        killed.kill()  # mid-run, for good: the reconnected host must take it all
        time.sleep(3)
    finally:
        load.stop()
    accepted = dict(load.accepted)
    assert len(accepted) > 20
    wait_for(lambda: cluster.finished(list(accepted)), 60, "every accepted job", interval=0.5)
    jobs = {
        r[0]: r
        for r in cluster.query(
            "SELECT id, status, attempts, error_code FROM job WHERE id = ANY(:ids)",
            ids=list(accepted),
        )
    }
    images: dict[str, list[int]] = {}
    for job_id, index in cluster.query(
        'SELECT job_id, "index" FROM image WHERE job_id = ANY(:ids)', ids=list(accepted)
    ):
        images.setdefault(job_id, []).append(index)
    failures = [jobs[j] for j in accepted if jobs[j][1] != "succeeded"]
    assert not failures, failures
    retried = 0
    for job_id, (prompt, n) in accepted.items():
        assert sorted(images[job_id]) == list(range(n)), job_id  # exactly once: n images
        calls = upstream.counts[prompt]
        attempts = jobs[job_id][2]
        assert 1 <= calls <= attempts <= MAX_ATTEMPTS, (job_id, calls, attempts)
        retried += attempts > 1
    assert retried, "the cut off and the killed host held jobs that other hosts finished"
    called_again = sum(upstream.counts[prompt] > 1 for prompt, _ in accepted.values())
    print(
        f"hosts: {len(accepted)} accepted, {len(accepted) - len(failures)} succeeded, "
        f"{load.refused} refused, {retried} taken over, {called_again} called upstream again"
    )


def test_an_api_host_killed_the_client_retries_its_key_at_the_other(cluster: Cluster) -> None:
    prompt = "[slow=1.5] keyed across a crash"
    headers = {"Idempotency-Key": "hosts-crash-1"}

    def first_try() -> httpx.Response | Exception:
        with cluster.http("api1") as one:
            try:
                return one.post(GENERATE, headers=headers, json=body(prompt))
            except httpx.TransportError as exc:
                return exc

    answer = cluster.client.pool.submit(first_try)
    wait_for(
        lambda: cluster.query("SELECT id FROM job WHERE request->>'prompt' = :p", p=prompt),
        15,
        "the job accepted",
    )
    cluster["api1"].kill()  # the host dies while its client waits
    assert isinstance(answer.result(15), httpx.TransportError)

    def retry() -> tuple[httpx.Response, httpx.Response]:
        with cluster.http("api2") as two:
            images = two.post(GENERATE, headers=headers, json=body(prompt))
            job = two.post(GENERATE, headers={**headers, **ASYNC}, json=body(prompt))
            return images, job

    images, job = cluster.client.run(retry)
    assert images.status_code == 200, images.text
    assert len(images.json()["data"]) == 1
    [(job_id, status)] = cluster.query(
        "SELECT id, status FROM job WHERE request->>'prompt' = :p", p=prompt
    )
    assert job.status_code == 202, job.text
    assert (job.json()["id"], status) == (job_id, "succeeded")
    assert job.json()["status"] in FINISHED
    assert cluster.upstream is not None
    assert cluster.upstream.counts[prompt] == 1
