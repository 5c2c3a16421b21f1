"""Keys (revocation, listing, admin API) and the limits that protect the service."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.processes import ServiceProcess, free_port, wait_for, wait_http
from tests.support.stack import Stack

ADMIN = {"Authorization": "Bearer sk-admin-test"}


def gen(stack: Stack, key: str, base: str | None = None, **extra: object) -> httpx.Response:
    body = {"model": "procedural", "prompt": "limits", "size": "64x64", **extra}
    return httpx.post(
        f"{base or stack.base_url}/v1/images/generations",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {key}"},
    )


def test_revoked_key_fails_at_once(stack: Stack) -> None:
    made = stack.cli("keys", "create", "--project", "revocable", "--user", "dave")
    key = made.strip().splitlines()[-1]  # printed once, on the last line
    assert gen(stack, key).status_code == 200
    listing = stack.cli("keys", "list", "--project", "revocable", "--json")
    rows = [json.loads(line) for line in listing.splitlines()]
    assert len(rows) == 1
    assert rows[0]["user"] == "dave"
    assert rows[0]["last_used_at"]
    assert key not in listing
    assert rows[0]["prefix"] == key[:10]
    stack.cli("keys", "revoke", rows[0]["id"])
    resp = gen(stack, key)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_admin_api_manages_projects_and_keys(stack: Stack) -> None:
    base = stack.base_url
    assert httpx.get(f"{base}/v1/admin/projects").status_code == 401
    assert (
        httpx.get(
            f"{base}/v1/admin/projects", headers={"Authorization": f"Bearer {stack.key_a}"}
        ).status_code
        == 401
    )
    resp = httpx.post(
        f"{base}/v1/admin/projects",
        headers=ADMIN,
        json={"name": "admin-made", "images_per_day": 100},
    )
    assert resp.status_code == 200
    assert resp.json()["images_per_day"] == 100
    dup = httpx.post(f"{base}/v1/admin/projects", headers=ADMIN, json={"name": "admin-made"})
    assert dup.status_code == 409
    made = httpx.post(
        f"{base}/v1/admin/keys",
        headers=ADMIN,
        json={"project": "admin-made", "name": "ci", "user": "erin"},
    ).json()
    key = made["key"]
    assert made["prefix"] == key[:10]
    assert made["user"] == "erin"
    assert gen(stack, key).status_code == 200
    keys = httpx.get(
        f"{base}/v1/admin/keys", headers=ADMIN, params={"project": "admin-made"}
    ).json()["data"]
    assert [k["id"] for k in keys] == [made["id"]]
    assert "key" not in keys[0]
    assert keys[0]["last_used_at"] is not None
    patched = httpx.patch(
        f"{base}/v1/admin/projects/admin-made", headers=ADMIN, json={"jobs_in_flight": 7}
    ).json()
    assert patched["jobs_in_flight"] == 7
    assert patched["images_per_day"] == 100
    revoked = httpx.post(f"{base}/v1/admin/keys/{made['id']}/revoke", headers=ADMIN).json()
    assert revoked["revoked_at"] is not None
    assert gen(stack, key).status_code == 401


@pytest.mark.parametrize("style", ["bearer", "basic", "x-api-key", "x-obiguard-api-key"])
def test_every_key_header_style_is_accepted(stack: Stack, style: str) -> None:
    headers = {
        "bearer": {"Authorization": f"Bearer {stack.key_a}"},
        "basic": {
            "Authorization": "Basic " + base64.b64encode(f"api:{stack.key_a}".encode()).decode()
        },
        "x-api-key": {"x-api-key": stack.key_a},
        "x-obiguard-api-key": {"x-obiguard-api-key": stack.key_a},
    }[style]
    assert httpx.get(f"{stack.base_url}/v1/models", headers=headers).status_code == 200


def test_requests_per_minute_limit_answers_429_and_recovers(stack: Stack) -> None:
    stack.cli("projects", "create", "rpm-limited", "--key-requests-per-minute", "3")
    key = stack.create_key("rpm-limited")
    time.sleep(4 - time.time() % 4 + 0.05)  # start of a (4 s, in tests) window
    codes = [
        httpx.get(
            f"{stack.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}
        ).status_code
        for _ in range(5)
    ]
    assert codes == [200, 200, 200, 429, 429]
    resp = gen(stack, key)
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(resp.headers["Retry-After"]) <= 4
    # The Weave surface answers in its own shape.
    weave = httpx.post(
        f"{stack.base_url}/image/create",
        headers={"Authorization": f"Bearer {key}"},
        json={"project_id": "rpm-limited", "inputs": {"model": "procedural", "prompt": "p"}},
    )
    assert weave.status_code == 429
    assert "detail" in weave.json()
    time.sleep(int(resp.headers["Retry-After"]) + 0.1)
    assert gen(stack, key).status_code == 200


def test_images_per_day_limit(stack: Stack) -> None:
    stack.cli("projects", "create", "daily-limited", "--images-per-day", "3")
    key = stack.create_key("daily-limited")
    assert gen(stack, key, n=2).status_code == 200
    resp = gen(stack, key, n=2)
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "images_per_day_exceeded"
    assert int(resp.headers["Retry-After"]) > 0
    assert gen(stack, key, n=1).status_code == 200  # what still fits is accepted


def test_jobs_in_flight_limit_frees_as_jobs_end(stack: Stack) -> None:
    stack.cli("projects", "create", "inflight-limited", "--jobs-in-flight", "2")
    key = stack.create_key("inflight-limited")
    headers = {"Authorization": f"Bearer {key}", "Prefer": "respond-async"}
    body = {"model": "parked", "prompt": "waits", "size": "64x64"}
    url = f"{stack.base_url}/v1/images/generations"
    first = httpx.post(url, json=body, headers=headers).json()
    assert httpx.post(url, json=body, headers=headers).status_code == 202
    third = httpx.post(url, json=body, headers=headers)
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "jobs_in_flight_exceeded"
    httpx.post(f"{stack.base_url}/v1/images/jobs/{first['id']}/cancel", headers=headers)
    assert httpx.post(url, json=body, headers=headers).status_code == 202


@pytest.fixture
def second_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    api = ServiceProcess(
        ["api"],
        {**stack.env, "IMAGEGEN_PORT": str(port)},
        tmp_path_factory.mktemp("api2") / "api.log",
    ).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        api.stop()


def test_limits_hold_across_two_api_processes(stack: Stack, second_api: str) -> None:
    stack.cli(
        "projects", "create", "two-apis", "--key-requests-per-minute", "0", "--images-per-day", "6"
    )
    key = stack.create_key("two-apis")
    codes: list[int] = []
    lock = threading.Lock()

    def hit(base: str) -> None:
        code = gen(stack, key, base=base).status_code
        with lock:
            codes.append(code)

    threads = [
        threading.Thread(target=hit, args=(base,)) for base in [stack.base_url, second_api] * 6
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [200] * 6 + [429] * 6


def test_projects_list_json_has_every_project_with_its_limits(stack: Stack) -> None:
    rows = [json.loads(line) for line in stack.cli("projects", "list", "--json").splitlines()]
    names = {row["name"]: row for row in rows}
    assert {"alpha", "beta"} <= set(names)
    assert set(names["alpha"]) >= {"id", "created_at", "images_per_day", "jobs_in_flight"}


def _usage_budgets(stack: Stack, key: str) -> dict[str, dict[str, Any]]:
    """``GET /v1/usage``'s budgets by scope and period (``project/day``)."""
    with stack.client(key) as client:
        rows = client.get("/v1/usage").json()["budgets"]
    return {f"{row['scope']}/{row['period']}": row for row in rows}


def test_a_request_over_budget_is_refused_before_any_upstream_call(stack: Stack) -> None:
    """Issue 26: 429 insufficient_quota in OpenAI's own shape (the openai package's
    RateLimitError, not retried), settlement at the job's cost, a key's own budget,
    and the Weave surface's own shape."""
    stack.cli("projects", "create", "budgeted")
    patched = httpx.patch(
        f"{stack.base_url}/v1/admin/projects/budgeted",
        headers=ADMIN,
        json={"daily_budget_usd": 0.025, "monthly_budget_usd": 10},
    ).json()
    assert (patched["daily_budget_usd"], patched["monthly_budget_usd"]) == (0.025, 10)
    key = stack.create_key("budgeted")
    with openai.OpenAI(api_key=key, base_url=f"{stack.base_url}/v1") as client:
        first = client.images.generate(model="priced", prompt="[budget] first", size="64x64", n=2)
        assert first.data is not None
        with pytest.raises(openai.RateLimitError) as refused:
            client.images.generate(model="priced", prompt="[budget] over", size="64x64")
        with pytest.raises(openai.RateLimitError) as streamed:  # a 429, not a 200 stream
            client.images.generate(
                model="priced", prompt="[budget] streamed", size="64x64", stream=True
            )
        # A model without a price is never refused by a budget.
        client.images.generate(model="procedural", prompt="[budget] free", size="64x64")
    assert refused.value.code == "insufficient_quota"
    assert refused.value.type == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "daily budget of $0.0250 cannot cover" in refused.value.message
    assert streamed.value.code == "insufficient_quota"
    assert not stack.upstream.calls_for("[budget] over")  # refused before any call
    assert not stack.upstream.calls_for("[budget] streamed")
    assert len(stack.upstream.calls_for("[budget] first")) >= 1
    budgets = _usage_budgets(stack, key)
    day = budgets["project/day"]
    assert (day["budget_usd"], day["spent_usd"], day["reserved_usd"]) == (0.025, 0.02, 0.0)
    assert day["remaining_usd"] == pytest.approx(0.005)
    assert budgets["project/month"]["spent_usd"] == 0.02
    assert "key/day" not in budgets
    weave = httpx.post(
        f"{stack.base_url}/image/create",
        headers={"Authorization": f"Bearer {key}"},
        json={"project_id": "budgeted", "inputs": {"model": "priced", "prompt": "[budget] w"}},
    )
    assert weave.status_code == 429
    assert "budget" in weave.json()["detail"]
    # A key's own budget, below its project's (none here).
    made = httpx.post(
        f"{stack.base_url}/v1/admin/keys",
        headers=ADMIN,
        json={"project": "alpha", "name": "capped", "daily_budget_usd": 0.005},
    ).json()
    assert made["daily_budget_usd"] == 0.005
    capped = gen(stack, made["key"], model="priced", prompt="[budget] capped")
    assert capped.status_code == 429
    assert capped.json()["error"] == {
        "code": "insufficient_quota",
        "type": "insufficient_quota",
        "message": capped.json()["error"]["message"],
        "param": None,
    }
    assert "API key's daily budget" in capped.json()["error"]["message"]
    assert _usage_budgets(stack, made["key"])["key/day"]["budget_usd"] == 0.005


def test_a_batch_out_of_budget_completes_with_the_rest_failed(stack: Stack) -> None:
    stack.cli("projects", "create", "batch-budget", "--daily-budget-usd", "0.035")
    key = stack.create_key("batch-budget")
    with stack.client(key) as api:
        batch = api.post(
            "/v1/images/batches",
            json={"prompts": [f"[budget] line {i}" for i in range(6)], "model": "priced"},
        ).json()
        wait_for(
            lambda: api.get(f"/v1/images/batches/{batch['id']}").json()["status"] == "completed",
            60,
            "batch out of budget",
        )
        items = api.get(f"/v1/images/batches/{batch['id']}/items").json()["data"]
        done = api.get(f"/v1/images/batches/{batch['id']}").json()
    assert [i["status"] for i in items] == ["succeeded"] * 3 + ["failed"] * 3
    for item in items[3:]:
        assert item["response"]["status_code"] == 429
        assert item["response"]["body"]["error"]["code"] == "insufficient_quota"
    assert done["request_counts"] == {"total": 6, "completed": 3, "failed": 3}
    assert done["error_file_id"]
    day = _usage_budgets(stack, key)["project/day"]
    assert (day["spent_usd"], day["reserved_usd"]) == (0.03, 0.0)
