"""Async mode, polling, listing and cancel."""

from __future__ import annotations

import time

import httpx

from tests.support.processes import wait_for
from tests.support.stack import Stack


def submit(
    client: httpx.Client, body: dict[str, object], prefer: str = "respond-async"
) -> httpx.Response:
    return client.post("/v1/images/generations", json=body, headers={"Prefer": prefer})


def test_respond_async_returns_202_job_then_polls_to_success(stack: Stack) -> None:
    with stack.client() as client:
        resp = submit(
            client, {"model": "procedural", "prompt": "async fox", "n": 2, "size": "64x64"}
        )
        assert resp.status_code == 202
        job = resp.json()
        assert job["status"] in ("queued", "running", "succeeded")
        assert job["object"] == "image.job"
        assert resp.headers["Location"] == f"/v1/images/jobs/{job['id']}"
        assert job["request"]["prompt"] == "async fox"
        assert job["request"]["n"] == 2
        done = stack.wait_job(job["id"])
        assert done["status"] == "succeeded"
        assert done["created_at"] <= done["started_at"] <= done["finished_at"]
        assert done["attempts"] == 1
        urls = [item["url"] for item in done["result"]["data"]]
        assert len(urls) == 2
        # Every read presigns afresh; the images themselves are the same.
        again = client.get(f"/v1/images/jobs/{job['id']}").json()
        assert len(again["result"]["data"]) == 2
        assert httpx.get(urls[0]).status_code == 200


def test_prefer_wait_answers_202_when_job_outlives_it(stack: Stack) -> None:
    with stack.client() as client:
        started = time.monotonic()
        resp = submit(
            client,
            {"model": "fake-fast", "prompt": "wait me [slow=2]", "size": "64x64"},
            prefer="wait=1",
        )
        assert resp.status_code == 202
        assert time.monotonic() - started < 2.5
        job = resp.json()
        assert job["status"] in ("queued", "running")
        assert stack.wait_job(job["id"])["status"] == "succeeded"


def test_list_jobs_newest_first_with_cursor_and_status_filter(stack: Stack) -> None:
    key = stack.create_key("lister")
    with stack.client(key) as client:
        ids = []
        for i in range(5):
            resp = client.post(
                "/v1/images/generations",
                json={"model": "procedural", "prompt": f"list {i}", "size": "64x64"},
            )
            assert resp.status_code == 200
        failed = submit(client, {"model": "fake-fast", "prompt": "[content-policy] list"})
        stack.wait_job(failed.json()["id"], key)
        page1 = client.get("/v1/images/jobs", params={"limit": 4}).json()
        assert page1["has_more"] is True
        assert len(page1["data"]) == 4
        page2 = client.get("/v1/images/jobs", params={"limit": 4, "after": page1["last_id"]}).json()
        assert page2["has_more"] is False
        assert len(page2["data"]) == 2
        ids = [j["id"] for j in page1["data"] + page2["data"]]
        assert len(set(ids)) == 6
        assert ids == sorted(ids, reverse=True)
        assert page1["data"][0]["id"] == failed.json()["id"]  # newest first
        only_failed = client.get("/v1/images/jobs", params={"status": "failed"}).json()
        assert [j["id"] for j in only_failed["data"]] == [failed.json()["id"]]
        assert only_failed["data"][0]["error"]["code"] == "content_policy_violation"
        bad = client.get("/v1/images/jobs", params={"status": "bogus"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "status"


def test_cancel_queued_job_never_runs(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(client, {"model": "parked", "prompt": "never run", "size": "64x64"}).json()
        assert job["status"] == "queued"
        resp = client.post(f"/v1/images/jobs/{job['id']}/cancel")
        assert resp.status_code == 200
        assert resp.json()["status"] == "canceled"
        assert resp.json()["canceled_at"]
        # Cancel is idempotent.
        assert client.post(f"/v1/images/jobs/{job['id']}/cancel").json()["status"] == "canceled"
        time.sleep(1.0)
        final = client.get(f"/v1/images/jobs/{job['id']}").json()
        assert final["status"] == "canceled"
        assert final["attempts"] == 0
        assert "result" not in final


def test_cancel_running_job_discards_its_result(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(
            client, {"model": "fake-fast", "prompt": "cancel me [slow=2]", "size": "64x64"}
        ).json()
        wait_for(
            lambda: client.get(f"/v1/images/jobs/{job['id']}").json()["status"] == "running",
            10,
            "job running",
        )
        assert client.post(f"/v1/images/jobs/{job['id']}/cancel").json()["status"] == "canceled"
        wait_for(lambda: stack.upstream.calls_for("cancel me"), 5, "upstream call")
        time.sleep(3)  # past the upstream's answer
        final = client.get(f"/v1/images/jobs/{job['id']}").json()
        assert final["status"] == "canceled"
        assert "result" not in final


def test_cancel_finished_job_conflicts(stack: Stack) -> None:
    with stack.client() as client:
        resp = submit(
            client, {"model": "procedural", "prompt": "done", "size": "64x64"}, prefer="wait=30"
        )
        assert resp.status_code == 200
        jobs = client.get("/v1/images/jobs", params={"limit": 1}).json()["data"]
        cancel = client.post(f"/v1/images/jobs/{jobs[0]['id']}/cancel")
        assert cancel.status_code == 409


def test_unknown_job_is_404(stack: Stack) -> None:
    with stack.client() as client:
        resp = client.get("/v1/images/jobs/job_doesnotexist")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"
