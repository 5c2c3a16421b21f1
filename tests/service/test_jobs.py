"""Jobs through the whole service in one process: submit, wait, poll, cancel."""

from __future__ import annotations

from tests.service.conftest import Service


def test_a_sync_generation_answers_with_its_images(service: Service) -> None:
    resp = service.client().post(
        "/v1/images/generations", json={"prompt": "a heron", "size": "64x64", "n": 2}
    )
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) == 2
    assert all(item["url"].startswith("http://service.test/v1/images/files/") for item in data)
    image = service.client().get(data[0]["url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"


def test_an_async_job_is_accepted_then_polled_to_success(service: Service) -> None:
    client = service.client()
    resp = client.post(
        "/v1/images/generations",
        headers={"Prefer": "respond-async"},
        json={"prompt": "a fox", "size": "64x64", "response_format": "b64_json"},
    )
    assert resp.status_code == 202
    job = resp.json()
    assert resp.headers["location"] == f"/v1/images/jobs/{job['id']}"
    assert job["status"] in ("queued", "running", "succeeded")
    polled = service.wait_for(
        f"/v1/images/jobs/{job['id']}",
        lambda j: j["status"] != "queued" and j["status"] != "running",
    )
    assert polled["status"] == "succeeded"
    assert polled["result"]["data"][0]["b64_json"]


def test_cancel_is_idempotent_and_records_one_webhook_event(service: Service) -> None:
    client = service.client()
    client.post("/v1/webhooks/endpoints", json={"url": "http://127.0.0.1:9/hook"})
    with service.paused():  # nothing runs the job before it is canceled
        job = client.post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async"},
            json={"prompt": "never", "size": "64x64"},
        ).json()
        first = client.post(f"/v1/images/jobs/{job['id']}/cancel")
        again = client.post(f"/v1/images/jobs/{job['id']}/cancel")
    assert first.status_code == 200
    assert first.json()["status"] == "canceled"
    assert again.status_code == 200
    deliveries = client.get("/v1/webhooks/deliveries", params={"job_id": job["id"]}).json()
    assert [d["event_type"] for d in deliveries["data"]] == ["job.canceled"]


def test_a_finished_job_cannot_be_canceled(service: Service) -> None:
    client = service.client()
    resp = client.post("/v1/images/generations", json={"prompt": "done", "size": "64x64"})
    assert resp.status_code == 200
    job_id = client.get("/v1/images/jobs", params={"limit": 1}).json()["data"][0]["id"]
    conflict = client.post(f"/v1/images/jobs/{job_id}/cancel")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"


def test_another_projects_job_is_not_found(service: Service) -> None:
    other = service.create_key("service-other")
    job = (
        service.client()
        .post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async"},
            json={"prompt": "mine", "size": "64x64"},
        )
        .json()
    )
    resp = service.client(other).get(f"/v1/images/jobs/{job['id']}")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"
