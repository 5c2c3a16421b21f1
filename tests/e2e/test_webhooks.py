"""Webhooks: signed as Standard Webhooks, delivered reliably, only to safe targets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.support.processes import ServiceProcess, free_port, wait_for, wait_http
from tests.support.receiver import Receiver
from tests.support.stack import Stack


@pytest.fixture(scope="module")
def hstack(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Stack]:
    s = Stack(Path(tmp_path_factory.mktemp("webhooks")), s3_endpoint)
    yield s
    s.close()


def deliveries(stack: Stack, key: str, **params: str) -> list[dict[str, Any]]:
    with stack.client(key) as client:
        found: list[dict[str, Any]] = client.get("/v1/webhooks/deliveries", params=params).json()[
            "data"
        ]
        return found


def delivery_status(stack: Stack, key: str, job_id: str) -> str | None:
    """The status of the job's only delivery; None until the event has happened."""
    found = deliveries(stack, key, job_id=job_id)
    return found[0]["status"] if found else None


def verify(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = Webhook(secret).verify(request["body"], request["headers"])
    return event  # (verify raises if the signature is bad)


def test_signed_webhooks_for_subscribed_events_only(hstack: Stack) -> None:
    key = hstack.create_key("hooks-signed")
    endpoint_rx, job_rx = Receiver().start(), Receiver().start()
    try:
        with hstack.client(key) as client:
            endpoint = client.post(
                "/v1/webhooks/endpoints",
                json={"url": endpoint_rx.url(), "events": ["job.started", "job.succeeded"]},
            ).json()
            default = client.get("/v1/webhooks/default/secret").json()["key"]
            assert client.get("/v1/webhooks/default/secret").json()["key"] == default
            listed = client.get("/v1/webhooks/endpoints").json()["data"]
        assert endpoint["secret"].startswith("whsec_")
        assert default.startswith("whsec_")
        assert "secret" not in listed[0]
        job = hstack.submit(
            "hooked",
            key=key,
            response_format="b64_json",
            webhook_url=job_rx.url("/per-job"),
            webhook_events=["job.succeeded"],
        )
        assert "whsec" not in json.dumps(job)
        at_endpoint = endpoint_rx.wait_requests(2)
        at_job = job_rx.wait_requests(1)
        hstack.wait_job(job["id"], key)
    finally:
        endpoint_rx.stop()
        job_rx.stop()
    events = [verify(endpoint["secret"], r) for r in at_endpoint]
    assert sorted(e["type"] for e in events) == ["job.started", "job.succeeded"]
    done = next(e for e in events if e["type"] == "job.succeeded")
    assert done["data"]["id"] == job["id"]
    assert done["data"]["status"] == "succeeded"
    item = done["data"]["result"]["data"][0]
    assert item["url"]
    assert "b64_json" not in item
    assert httpx.get(item["url"]).status_code == 200
    per_job = verify(default, at_job[0])
    assert per_job["type"] == "job.succeeded"
    assert at_job[0]["path"] == "/per-job"
    assert len(job_rx.requests) == 1  # job.started was not subscribed there
    with pytest.raises(WebhookVerificationError):
        verify(endpoint["secret"], at_job[0])
    ids = {r["headers"]["webhook-id"] for r in at_endpoint}
    assert len(ids) == 2


def test_endpoint_added_or_deleted_counts_from_the_next_job(hstack: Stack) -> None:
    """The worker caches who subscribes per project: a change takes effect at once."""
    key = hstack.create_key("hooks-cache")
    rx = Receiver().start()
    try:
        first = hstack.submit("nobody listens yet", key=key)
        hstack.wait_job(first["id"], key)  # the worker now knows: no endpoints
        with hstack.client(key) as client:
            endpoint = client.post(
                "/v1/webhooks/endpoints", json={"url": rx.url(), "events": ["job.succeeded"]}
            ).json()
        second = hstack.submit("now one listens", key=key)
        hstack.wait_job(second["id"], key)
        delivered = [verify(endpoint["secret"], r) for r in rx.wait_requests(1)]
        assert [e["data"]["id"] for e in delivered] == [second["id"]]
        with hstack.client(key) as client:
            assert client.delete(f"/v1/webhooks/endpoints/{endpoint['id']}").status_code == 200
        third = hstack.submit("nobody listens again", key=key)
        hstack.wait_job(third["id"], key)
        assert deliveries(hstack, key, job_id=third["id"]) == []
        assert deliveries(hstack, key, job_id=first["id"]) == []
        assert len(rx.requests) == 1
    finally:
        rx.stop()


def test_receiver_down_then_500_then_200_same_webhook_id(hstack: Stack) -> None:
    key = hstack.create_key("hooks-retry")
    rx = Receiver()  # not listening yet: connection refused
    job = hstack.submit(
        key=key, prompt="retry me", webhook_url=rx.url(), webhook_events=["job.succeeded"]
    )
    wait_for(
        lambda: any(d["attempts"] >= 1 for d in deliveries(hstack, key, job_id=job["id"])),
        30,
        "first attempt",
    )
    first = deliveries(hstack, key, job_id=job["id"])[0]
    assert first["status"] == "pending"
    assert "Connect" in first["last_error"]
    rx.answer(500, 200).start()
    try:
        requests = rx.wait_requests(2)
        wait_for(lambda: delivery_status(hstack, key, job["id"]) == "succeeded", 30, "delivered")
    finally:
        rx.stop()
    assert [r["headers"]["webhook-id"] for r in requests] == [first["id"], first["id"]]
    final = deliveries(hstack, key, job_id=job["id"])[0]
    assert final["attempts"] == 3
    assert [a["status_code"] for a in final["attempt_log"]] == [None, 500, 200]


def test_410_disables_the_endpoint(hstack: Stack) -> None:
    key = hstack.create_key("hooks-gone")
    rx = Receiver().answer(410).start()
    try:
        with hstack.client(key) as client:
            endpoint = client.post(
                "/v1/webhooks/endpoints", json={"url": rx.url(), "events": ["job.succeeded"]}
            ).json()
        job = hstack.submit("gone", key=key)
        rx.wait_requests(1)
        wait_for(lambda: delivery_status(hstack, key, job["id"]) == "failed", 30, "failed delivery")
        with hstack.client(key) as client:
            ep = client.get(f"/v1/webhooks/endpoints/{endpoint['id']}").json()
        assert ep["disabled_at"] is not None
        assert "410" in ep["disabled_reason"]
        second = hstack.submit("after gone", key=key)
        hstack.wait_job(second["id"], key)
        assert deliveries(hstack, key, job_id=second["id"]) == []
        assert len(rx.requests) == 1
    finally:
        rx.stop()


def test_redirect_is_not_followed(hstack: Stack) -> None:
    key = hstack.create_key("hooks-redirect")
    rx = Receiver().start()
    rx.answer(*[(302, {"Location": rx.url("/elsewhere")})] * 5)
    try:
        job = hstack.submit(
            key=key, prompt="redirected", webhook_url=rx.url(), webhook_events=["job.succeeded"]
        )
        wait_for(
            lambda: delivery_status(hstack, key, job["id"]) == "failed", 30, "delivery given up"
        )
    finally:
        rx.stop()
    assert {r["path"] for r in rx.requests} == {"/hook"}
    final = deliveries(hstack, key, job_id=job["id"])[0]
    assert final["last_status_code"] == 302
    assert final["attempts"] == 5


def test_worker_killed_between_attempts_does_not_lose_the_delivery(hstack: Stack) -> None:
    key = hstack.create_key("hooks-kill")
    rx = Receiver()
    job = hstack.submit(
        key=key, prompt="survive", webhook_url=rx.url(), webhook_events=["job.succeeded"]
    )
    wait_for(
        lambda: any(d["attempts"] >= 1 for d in deliveries(hstack, key, job_id=job["id"])),
        30,
        "first attempt",
    )
    hstack.kill_consumers()  # a crash; the supervisor starts a new consumer
    rx.start()
    try:
        requests = rx.wait_requests(1, timeout=60)
    finally:
        rx.stop()
    delivery = deliveries(hstack, key, job_id=job["id"])[0]
    assert requests[0]["headers"]["webhook-id"] == delivery["id"]


def test_redeliver_sends_the_same_message_again(hstack: Stack) -> None:
    key = hstack.create_key("hooks-redeliver")
    rx = Receiver().start()
    try:
        job = hstack.submit(
            key=key, prompt="again", webhook_url=rx.url(), webhook_events=["job.succeeded"]
        )
        rx.wait_requests(1)
        delivery = deliveries(hstack, key, job_id=job["id"])[0]
        with hstack.client(key) as client:
            assert (
                client.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver").status_code
                == 200
            )
        requests = rx.wait_requests(2)
    finally:
        rx.stop()
    assert requests[0]["body"] == requests[1]["body"]
    assert requests[1]["headers"]["webhook-id"] == delivery["id"]


def test_rotated_secret_signs_the_next_deliveries(hstack: Stack) -> None:
    key = hstack.create_key("hooks-rotate")
    rx = Receiver().start()
    try:
        with hstack.client(key) as client:
            endpoint = client.post(
                "/v1/webhooks/endpoints", json={"url": rx.url(), "events": ["job.succeeded"]}
            ).json()
            rotated = client.post(f"/v1/webhooks/endpoints/{endpoint['id']}/rotate_secret").json()
        assert rotated["secret"] != endpoint["secret"]
        hstack.submit("rotated", key=key)
        request = rx.wait_requests(1)[0]
    finally:
        rx.stop()
    assert verify(rotated["secret"], request)["type"] == "job.succeeded"


@pytest.fixture(scope="module")
def strict_api(hstack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API process with the default: private targets refused (one for the module)."""
    tmp_path = tmp_path_factory.mktemp("strict-api")
    port = free_port()
    env = {
        **hstack.env,
        "IMAGEGEN_PORT": str(port),
        "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS": "false",
    }
    api = ServiceProcess(["api"], env, tmp_path / "api.log").start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        api.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "http://[::1]/hook",
        "http://100.100.100.200/",
        "ftp://example.com/hook",
        "not a url",
    ],
)
def test_private_targets_are_refused_at_registration(
    hstack: Stack, strict_api: str, url: str
) -> None:
    key = hstack.create_key("hooks-strict")
    headers = {"Authorization": f"Bearer {key}"}
    resp = httpx.post(f"{strict_api}/v1/webhooks/endpoints", json={"url": url}, headers=headers)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "url"
    resp = httpx.post(
        f"{strict_api}/v1/images/generations",
        headers=headers,
        json={"prompt": "p", "webhook_url": url},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "webhook_url"


def test_private_target_refused_again_at_delivery(hstack: Stack) -> None:
    """Registered while allowed, delivered by a worker that refuses it: no request."""
    key = hstack.create_key("hooks-strict-worker")
    rx = Receiver().start()
    hstack.worker.stop()
    hstack.new_worker({"IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS": "false"})
    try:
        job = hstack.submit(
            key=key, prompt="refused", webhook_url=rx.url(), webhook_events=["job.succeeded"]
        )
        wait_for(
            lambda: delivery_status(hstack, key, job["id"]) == "failed", 30, "refused delivery"
        )
        delivery = deliveries(hstack, key, job_id=job["id"])[0]
        assert "non-public" in delivery["last_error"]
        assert delivery["attempts"] == 1
        assert rx.requests == []
    finally:
        rx.stop()
        hstack.worker.stop()
        hstack.new_worker()
