"""The Weave surface: the weave package's own client, byte-for-byte raw requests,
and a trace call for every generation on both surfaces."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from weave.trace_server_bindings.remote_http_trace_server import RemoteHTTPTraceServer
from weave.utils import http_requests

from tests.support.stack import Stack

PROJECT = "acme/weave-demo"


@pytest.fixture(scope="module")
def weave_key(stack: Stack) -> str:
    return stack.create_key(PROJECT, user="alice")


@pytest.fixture(scope="module")
def server(stack: Stack, weave_key: str) -> Iterator[RemoteHTTPTraceServer]:
    srv = RemoteHTTPTraceServer(stack.base_url)
    srv.set_auth(("api", weave_key))
    yield srv
    # The weave client keeps its SDK client and one process-wide connection pool
    # (functools.cache); close both with this module so no socket outlives the stack.
    srv._stainless_client.close()
    http_requests._get_client().close()
    http_requests._build_client.cache_clear()


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"api:{key}".encode()).decode()


def stream(stack: Stack, key: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = httpx.post(
        f"{stack.base_url}/calls/stream_query",
        json=body,
        headers={"Authorization": basic(key)},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines() if line]


def test_weave_client_image_create_then_read_and_query(
    stack: Stack, server: RemoteHTTPTraceServer
) -> None:
    res = server.image_create(
        {
            "project_id": PROJECT,
            "wb_user_id": "mallory",
            "inputs": {  # type: ignore[typeddict-unknown-key]
                "model": "procedural",
                "prompt": "weave heron",
                "size": "64x64",
                "n": 2,
                "bogus_key": 1,
            },
        }
    )
    assert res.weave_call_id
    response: Any = res.response
    data = response["data"]
    assert len(data) == 2
    assert all("X-Amz-Signature" in item["url"] for item in data)
    assert response["model"] == "procedural"
    assert httpx.get(data[0]["url"]).status_code == 200  # a durable URL of our storage

    call: Any = server.call_read({"project_id": PROJECT, "id": res.weave_call_id}).call
    assert call is not None
    assert call.op_name == "weave.image_generation_create"
    assert call.wb_user_id == "alice"  # from the key, never from the client
    assert call.inputs["prompt"] == "weave heron"
    assert call.inputs["n"] == 2
    assert call.started_at.tzinfo is not None
    assert call.ended_at is not None
    assert call.started_at <= call.ended_at
    assert call.exception is None
    assert call.summary["weave"]["status"] == "success"
    assert call.summary["weave"]["latency_ms"] >= 0
    assert call.parent_id is None
    assert call.trace_id != call.id
    assert len(call.output["data"]) == 2
    assert call.attributes["job_id"].startswith("job_")

    streamed = list(
        server.calls_query_stream(
            {"project_id": PROJECT, "filter": {"call_ids": [res.weave_call_id]}}
        )
    )
    assert [c.id for c in streamed] == [res.weave_call_id]
    stats = server.calls_query_stats(
        {"project_id": PROJECT, "filter": {"call_ids": [res.weave_call_id]}}
    )
    assert stats.count == 1


def test_raw_body_without_content_type_and_basic_auth(stack: Stack, weave_key: str) -> None:
    """What the weave client sends: model_dump_json() as raw bytes, no Content-Type."""
    body = json.dumps(
        {
            "project_id": PROJECT,
            "inputs": {"model": "procedural", "prompt": "raw bytes", "n": None},
            "wb_user_id": None,
            "track_llm_call": None,
        }
    ).encode()
    req = httpx.Request(
        "POST",
        f"{stack.base_url}/image/create",
        content=body,
        headers={"Authorization": basic(weave_key), "X-Weave-Retry-Id": "retry-1"},
    )
    req.headers.pop("Content-Type", None)
    with httpx.Client(timeout=60) as plain:
        resp = plain.send(req)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["weave_call_id"]
    assert out["response"]["data"][0]["url"]


def test_bearer_auth_also_accepted(stack: Stack, weave_key: str) -> None:
    resp = httpx.post(
        f"{stack.base_url}/image/create",
        timeout=60,
        headers={"Authorization": f"Bearer {weave_key}"},
        json={
            "project_id": PROJECT,
            "inputs": {
                "model": "procedural",
                "prompt": "bearer",
                "size": "64x64",
                "response_format": "b64_json",
            },
        },
    )
    assert resp.status_code == 200
    assert resp.json()["response"]["data"][0]["b64_json"]


def test_schema_errors_are_422_http_validation_error(stack: Stack, weave_key: str) -> None:
    resp = httpx.post(
        f"{stack.base_url}/image/create",
        timeout=30,
        headers={"Authorization": basic(weave_key)},
        json={"project_id": PROJECT, "inputs": {"model": "procedural"}},
    )
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert detail[0]["loc"] == ["body", "inputs", "prompt"]
    assert detail[0]["msg"]


def test_auth_and_project_errors_use_weave_shapes(stack: Stack, weave_key: str) -> None:
    body = {"project_id": PROJECT, "inputs": {"model": "procedural", "prompt": "p"}}
    resp = httpx.post(f"{stack.base_url}/image/create", json=body, timeout=30)
    assert resp.status_code == 401
    assert "detail" in resp.json()
    other = {**body, "project_id": "someone/else"}
    resp = httpx.post(
        f"{stack.base_url}/image/create",
        json=other,
        timeout=30,
        headers={"Authorization": basic(weave_key)},
    )
    assert resp.status_code == 403
    assert "someone/else" in resp.json()["detail"]


def test_provider_failure_answers_200_error_and_is_recorded(stack: Stack, weave_key: str) -> None:
    resp = httpx.post(
        f"{stack.base_url}/image/create",
        timeout=60,
        headers={"Authorization": basic(weave_key)},
        json={
            "project_id": PROJECT,
            "inputs": {"model": "fake-fast", "prompt": "[content-policy] weave", "size": "64x64"},
        },
    )
    assert resp.status_code == 200
    out = resp.json()
    assert out["weave_call_id"] is None
    assert "safety system" in out["response"]["error"]
    # Still a failed job, and a call with the exception.
    with stack.client(weave_key) as client:
        jobs = client.get("/v1/images/jobs", params={"status": "failed"}).json()["data"]
    job = next(j for j in jobs if j["request"]["prompt"] == "[content-policy] weave")
    assert job["error"]["code"] == "content_policy_violation"
    assert job["call_id"]
    calls = stream(
        stack, weave_key, {"project_id": PROJECT, "filter": {"call_ids": [job["call_id"]]}}
    )
    assert calls[0]["exception"]
    assert "safety system" in calls[0]["exception"]
    assert calls[0]["summary"]["weave"]["status"] == "error"


def test_invalid_inputs_answer_200_error(stack: Stack, weave_key: str) -> None:
    resp = httpx.post(
        f"{stack.base_url}/image/create",
        timeout=30,
        headers={"Authorization": basic(weave_key)},
        json={"project_id": PROJECT, "inputs": {"model": "no-such-model", "prompt": "p"}},
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["weave_call_id"] is None
    assert body["response"]["error"].startswith("The model 'no-such-model' does not exist.")
    assert "Available: procedural, dall-e-2" in body["response"]["error"]


def test_track_llm_call_false_records_no_call_but_runs(stack: Stack, weave_key: str) -> None:
    before = stream(stack, weave_key, {"project_id": PROJECT})
    resp = httpx.post(
        f"{stack.base_url}/image/create",
        timeout=60,
        headers={"Authorization": basic(weave_key)},
        json={
            "project_id": PROJECT,
            "track_llm_call": False,
            "inputs": {"model": "procedural", "prompt": "untracked"},
        },
    )
    assert resp.status_code == 200
    assert resp.json()["weave_call_id"] is None
    assert resp.json()["response"]["data"][0]["url"]
    after = stream(stack, weave_key, {"project_id": PROJECT})
    assert len(after) == len(before)


def test_openai_surface_records_calls_named_by_the_job(stack: Stack) -> None:
    key = stack.create_key("openai-traces", user="bob")
    with stack.client(key) as client:
        resp = client.post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async"},
            json={"model": "gpt-image-1", "prompt": "traced", "size": "64x64"},
        )
        job = stack.wait_job(resp.json()["id"], key)
    assert job["status"] == "succeeded"
    assert job["call_id"]
    assert job["request"]["user"] == "bob"  # the key's identity fills OpenAI's user
    calls = stream(
        stack, key, {"project_id": "openai-traces", "filter": {"call_ids": [job["call_id"]]}}
    )
    call = calls[0]
    assert call["op_name"] == "openai.images.generate"
    assert call["wb_user_id"] == "bob"
    assert call["summary"]["usage"]["gpt-image-1"]["total_tokens"] == 110
    assert call["output"]["usage"]["prompt_tokens"] == 10
    assert call["output"]["data"][0]["url"]


def test_stream_query_filters_sort_limit_offset(stack: Stack) -> None:
    key = stack.create_key("filters", user="carol")
    with stack.client(key) as client:
        for i in range(3):
            assert (
                client.post(
                    "/v1/images/generations",
                    json={"model": "procedural", "prompt": f"filter {i}", "size": "64x64"},
                ).status_code
                == 200
            )
    resp = httpx.post(
        f"{stack.base_url}/image/create",
        timeout=60,
        headers={"Authorization": basic(key)},
        json={"project_id": "filters", "inputs": {"model": "procedural", "prompt": "filter weave"}},
    )
    weave_id = resp.json()["weave_call_id"]
    every = stream(stack, key, {"project_id": "filters"})
    assert len(every) == 4
    ops = stream(
        stack,
        key,
        {"project_id": "filters", "filter": {"op_names": ["weave.image_generation_create"]}},
    )
    assert [c["id"] for c in ops] == [weave_id]
    by_trace = stream(
        stack, key, {"project_id": "filters", "filter": {"trace_ids": [every[0]["trace_id"]]}}
    )
    assert [c["id"] for c in by_trace] == [every[0]["id"]]
    assert (
        len(stream(stack, key, {"project_id": "filters", "filter": {"wb_user_ids": ["carol"]}}))
        == 4
    )
    assert (
        stream(stack, key, {"project_id": "filters", "filter": {"wb_user_ids": ["nobody"]}}) == []
    )
    assert (
        len(stream(stack, key, {"project_id": "filters", "filter": {"trace_roots_only": True}}))
        == 4
    )
    desc = stream(
        stack,
        key,
        {"project_id": "filters", "sort_by": [{"field": "started_at", "direction": "desc"}]},
    )
    assert [c["id"] for c in desc] == [c["id"] for c in reversed(every)]
    page = stream(stack, key, {"project_id": "filters", "limit": 2, "offset": 1})
    assert [c["id"] for c in page] == [c["id"] for c in every[1:3]]
    stats = httpx.post(
        f"{stack.base_url}/calls/query_stats",
        timeout=30,
        headers={"Authorization": basic(key)},
        json={"project_id": "filters", "filter": {"op_names": ["openai.images.generate"]}},
    )
    assert stats.json() == {"count": 3}
