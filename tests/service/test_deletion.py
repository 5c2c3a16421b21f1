"""Deletion on demand (issue 29), in-process on local storage and on S3 (moto): a
job's images and an edit's inputs gone from storage at once, the job answering
404 after (a second delete too), lists skipping it, its image URLs 404, the
deletion audited; a queued job canceled first; a job deleted while its attempt
runs keeps none of what that attempt stores; a batch deleted only once it ended,
with its jobs and files; the CLI's delete commands."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any
from uuid import uuid4

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlmodel import col, select
from typer.testing import CliRunner

from cli import client as cli_client
from cli.main import app as cli_app
from shared.audit.models import AuditEvent
from shared.batches.models import BatchItem
from shared.core.context import current
from shared.core.db import unit_of_work
from shared.core.settings import Settings
from shared.core.storage import S3Storage, get_storage
from shared.files import service as files_service
from shared.files.models import File
from shared.jobs.models import Job
from shared.webhooks.models import WebhookDelivery
from tests.service.conftest import BASE_URL, Service
from worker import produce as worker_produce
from worker import runner


def _objects(project_id: str, job_id: str) -> list[str]:
    return [obj.key for obj in get_storage().scan(f"{project_id}/{job_id}/")]


def _job_row(job_id: str) -> Job:
    with unit_of_work() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _audit(action: str, target: str) -> list[AuditEvent]:
    with unit_of_work() as session:
        rows = list(
            session.exec(
                select(AuditEvent).where(
                    col(AuditEvent.action) == action, col(AuditEvent.target) == target
                )
            )
        )
        for row in rows:
            session.expunge(row)
        return rows


def _line_jobs(batch_id: str) -> list[str]:
    with unit_of_work() as session:
        return [str(j) for j in session.exec(select(Job.id).where(Job.batch_id == batch_id)).all()]


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (64, 64), (200, 10, 10, 255)).save(out, "PNG")
    return out.getvalue()


def test_a_finished_job_is_deleted_with_its_images(service: Service) -> None:
    client = service.client()
    answer = client.post(
        "/v1/images/generations",
        headers={"Prefer": "respond-async"},
        json={"prompt": "a gull", "size": "64x64", "n": 2},
    ).json()
    job = service.wait_for(f"/v1/images/jobs/{answer['id']}", lambda j: j["status"] == "succeeded")
    url = job["result"]["data"][0]["url"]
    assert client.get(url).status_code == 200
    row = _job_row(job["id"])
    assert len(_objects(row.project_id, row.id)) == 2

    deleted = client.delete(f"/v1/images/jobs/{job['id']}")

    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": job["id"], "object": "image.job", "deleted": True}
    assert _objects(row.project_id, row.id) == []
    gone = client.get(f"/v1/images/jobs/{job['id']}")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "not_found"
    assert client.get(url).status_code == 404
    listed = client.get("/v1/images/jobs", params={"limit": 100}).json()["data"]
    assert job["id"] not in [j["id"] for j in listed]
    again = client.delete(f"/v1/images/jobs/{job['id']}")
    assert again.status_code == 404
    assert _job_row(job["id"]).deleted_at is not None  # the tombstone
    [event] = _audit("job.delete", job["id"])
    assert event.project_id == row.project_id
    assert event.details["objects"] == 2


def test_another_projects_job_cannot_be_deleted(service: Service) -> None:
    job = (
        service.client()
        .post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async"},
            json={"prompt": "mine", "size": "64x64"},
        )
        .json()
    )
    other = service.client(service.create_key("service-deletion-other"))
    assert other.delete(f"/v1/images/jobs/{job['id']}").status_code == 404
    assert service.client().get(f"/v1/images/jobs/{job['id']}").status_code == 200


def test_a_queued_edit_is_canceled_then_deleted_with_its_inputs(service: Service) -> None:
    client = service.client()
    with service.paused():
        answer = client.post(
            "/v1/images/edits",
            headers={"Prefer": "respond-async"},
            data={"prompt": "repaint", "size": "64x64"},
            files={"image": ("in.png", _png(), "image/png")},
        )
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        row = _job_row(job_id)
        assert _objects(row.project_id, job_id)  # the input, stored under the job

        assert client.delete(f"/v1/images/jobs/{job_id}").status_code == 200

        assert _objects(row.project_id, job_id) == []
        after = _job_row(job_id)
        assert (after.status, after.deleted_at is not None) == ("canceled", True)
    assert client.get(f"/v1/images/jobs/{job_id}").status_code == 404


def test_a_job_deleted_while_it_runs_keeps_nothing_its_attempt_stores(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt is deleted under it (canceled, then a tombstone) before it stores
    its images: its end is discarded, and what it stored is removed."""
    client = service.client()
    produce = worker_produce.produce

    def deleted_meanwhile(job: Job) -> Any:
        assert client.delete(f"/v1/images/jobs/{job.id}").status_code == 200
        return produce(job)  # stores its images, as a late worker would

    with service.paused():
        job_id = client.post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async"},
            json={"prompt": "late", "size": "64x64", "n": 2},
        ).json()["id"]
        monkeypatch.setattr(runner, "produce", deleted_meanwhile)
        outcome = runner.run_job(job_id)
    row = _job_row(job_id)
    assert outcome == "discarded"
    assert (row.status, row.deleted_at is not None) == ("canceled", True)
    assert _objects(row.project_id, job_id) == []
    with unit_of_work() as session:
        from shared.jobs.models import Image as ImageRow

        assert not list(session.exec(select(ImageRow).where(col(ImageRow.job_id) == job_id)))


def test_a_batch_is_deleted_once_it_ended_with_its_jobs_and_files(service: Service) -> None:
    client = service.client()
    with service.paused():
        batch = client.post(
            "/v1/images/batches", json={"prompts": ["one", "two"], "size": "64x64"}
        ).json()
        running = client.delete(f"/v1/images/batches/{batch['id']}")
        assert running.status_code == 409
        assert running.json()["error"]["code"] == "conflict"
    ended = service.wait_for(
        f"/v1/images/batches/{batch['id']}", lambda b: b["status"] == "completed"
    )
    items = client.get(f"/v1/images/batches/{batch['id']}/items").json()["data"]
    job_ids = [item["job_id"] for item in items]
    project = _job_row(job_ids[0]).project_id
    assert all(_objects(project, job_id) for job_id in job_ids)
    output = ended.get("output_file_id")

    deleted = client.delete(f"/v1/batches/{batch['id']}")

    assert deleted.json() == {"id": batch["id"], "object": "batch", "deleted": True}
    assert client.get(f"/v1/images/batches/{batch['id']}").status_code == 404
    assert batch["id"] not in [b["id"] for b in client.get("/v1/batches").json()["data"]]
    for job_id in job_ids:
        assert client.get(f"/v1/images/jobs/{job_id}").status_code == 404
        assert _objects(project, job_id) == []
    if output:
        assert client.get(f"/v1/files/{output}").status_code == 404
    assert client.delete(f"/v1/images/batches/{batch['id']}").status_code == 404
    [event] = _audit("batch.delete", batch["id"])
    assert event.details["jobs"] == 2


def test_an_openai_batch_deletes_its_output_not_the_users_input_file(service: Service) -> None:
    client = service.client()
    line = '{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", '
    line += '"body": {"prompt": "a wren", "size": "64x64"}}\n'
    file = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", line.encode(), "application/jsonl")},
    ).json()
    batch = client.post(
        "/v1/batches",
        json={
            "input_file_id": file["id"],
            "endpoint": "/v1/images/generations",
            "completion_window": "24h",
        },
    ).json()
    ended = service.wait_for(f"/v1/batches/{batch['id']}", lambda b: b["status"] == "completed")
    assert ended["output_file_id"]
    (job_id,) = _line_jobs(batch["id"])
    # A line's job goes with its batch, not alone (the batch's results name it).
    refused = client.delete(f"/v1/images/jobs/{job_id}")
    assert refused.status_code == 409, refused.text
    assert batch["id"] in refused.json()["error"]["message"]

    assert client.delete(f"/v1/batches/{batch['id']}").status_code == 200
    assert client.get(f"/v1/files/{ended['output_file_id']}").status_code == 404
    assert client.get(f"/v1/files/{ended['output_file_id']}/content").status_code == 404
    assert client.get(f"/v1/images/jobs/{job_id}").status_code == 404
    # The input is the user's own Files object: another batch may read it.
    assert client.get(f"/v1/files/{file['id']}/content").text == line
    # The lines' requests went with the batch.
    with unit_of_work() as session:
        bodies = session.exec(select(BatchItem.body).where(BatchItem.batch_id == batch["id"])).all()
    assert bodies == [{}]


class _InProcess(TestClient):
    """The CLI's client, on the app in this process (its lifespan already runs)."""

    def __init__(self, like: TestClient) -> None:
        super().__init__(like.app, base_url=BASE_URL, headers=dict(like.headers))

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_the_cli_deletes_a_job_and_a_batch(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``imagegen jobs delete`` and ``imagegen batch delete`` over the API."""
    client = service.client()
    job = client.post("/v1/images/generations", json={"prompt": "cli", "size": "64x64"})
    job_id = client.get("/v1/images/jobs", params={"limit": 1}).json()["data"][0]["id"]
    assert job.status_code == 200
    batch = client.post("/v1/images/batches", json={"prompts": ["c"], "size": "64x64"}).json()
    service.wait_for(f"/v1/images/batches/{batch['id']}", lambda b: b["status"] == "completed")
    monkeypatch.setattr(cli_client, "connect", lambda base_url, api_key: _InProcess(client))
    cli = CliRunner()
    deleted = cli.invoke(cli_app, ["jobs", "delete", job_id, "--json", "--api-key", "k"])
    assert deleted.exit_code == 0, deleted.output
    assert json.loads(deleted.stdout) == {"id": job_id, "object": "image.job", "deleted": True}
    again = cli.invoke(cli_app, ["jobs", "delete", job_id, "--api-key", "k"])
    assert again.exit_code == 1
    gone = cli.invoke(cli_app, ["batch", "delete", batch["id"], "--json", "--api-key", "k"])
    assert gone.exit_code == 0, gone.output
    assert client.get(f"/v1/images/batches/{batch['id']}").status_code == 404


@pytest.fixture
def on_s3(service: Service, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    """The service's storage (the API's and the in-process worker's) on moto's S3."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    bucket = f"deletion-{uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    s3 = S3Storage(Settings(s3_bucket=bucket, s3_endpoint_url=s3_endpoint))
    for made in (current(), service.app.state.context):  # the same one, or two
        monkeypatch.setattr(made, "storage", s3)
    return s3


def test_a_job_on_s3_is_deleted_with_its_objects(service: Service, on_s3: S3Storage) -> None:
    client = service.client()
    resp = client.post(
        "/v1/images/generations", json={"prompt": "a tern on s3", "size": "64x64", "n": 3}
    )
    assert resp.status_code == 200, resp.text
    job_id = client.get("/v1/images/jobs", params={"limit": 1}).json()["data"][0]["id"]
    project = _job_row(job_id).project_id
    url = resp.json()["data"][0]["url"]
    assert httpx.get(url).status_code == 200  # presigned, answered by S3
    assert len([o.key for o in on_s3.scan(f"{project}/{job_id}/")]) == 3

    assert client.delete(f"/v1/images/jobs/{job_id}").status_code == 200

    assert list(on_s3.scan(f"{project}/{job_id}/")) == []
    assert httpx.get(url).status_code == 404  # S3's own answer: the object is gone
    assert client.get(f"/v1/images/jobs/{job_id}").status_code == 404


def test_a_deleted_jobs_trace_call_and_webhook_deliveries_are_gone(service: Service) -> None:
    """Its trace call held the prompt and its output the image links, its delivery the
    whole job: neither is shown once the job is deleted, nor sent again."""
    key = service.create_key("deletion-traces")
    client = service.client(key)
    hook = {"webhook_url": "http://127.0.0.1:9/hook", "webhook_events": ["job.succeeded"]}
    answer = client.post(
        "/v1/images/generations",
        headers={"Prefer": "respond-async"},
        json={"prompt": "a secret heron", "size": "64x64", **hook},
    ).json()
    deadline = time.monotonic() + 15
    while (job := client.get(f"/v1/images/jobs/{answer['id']}").json())["status"] != "succeeded":
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    project = _job_row(job["id"]).project_id
    weave = {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()}
    read = {"project_id": project, "id": job["call_id"]}
    assert client.post("/call/read", headers=weave, json=read).json()["call"] is not None
    deliveries = client.get("/v1/webhooks/deliveries", params={"job_id": job["id"]}).json()
    [delivery] = deliveries["data"]
    assert delivery["status"] == "pending"  # no webhook worker runs here

    assert client.delete(f"/v1/images/jobs/{job['id']}").status_code == 200

    assert client.post("/call/read", headers=weave, json=read).json()["call"] is None
    query = {"project_id": project, "filter": {"call_ids": [job["call_id"]]}}
    assert client.post("/calls/stream_query", headers=weave, json=query).text == ""
    assert client.get("/v1/webhooks/deliveries").json()["data"] == []
    resend = client.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver")
    assert resend.status_code == 404
    with unit_of_work() as session:
        row = session.get(WebhookDelivery, delivery["id"])
        assert row is not None
        assert row.status == "failed"  # never sent again
        assert row.last_error == "job deleted"


def test_a_file_delete_is_audited_and_of_two_deletes_one_404s(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = service.create_key("deletion-files")
    client = service.client(key)
    upload = client.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", b"{}\n")}
    ).json()
    twin = client.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("twin.jsonl", b"{}\n")}
    ).json()

    assert client.delete(f"/v1/files/{upload['id']}").status_code == 200
    [event] = _audit("file.delete", upload["id"])
    assert event.actor.startswith("key_")
    assert event.details == {"filename": "in.jsonl", "purpose": "batch", "bytes": 3}
    assert client.delete(f"/v1/files/{upload['id']}").status_code == 404

    # Two deletes at once: both read the file before either marks it; the one that
    # marks it second answers 404 and records nothing.
    with unit_of_work() as session:
        stale = session.get(File, twin["id"])
        assert stale is not None
        session.expunge(stale)
    assert client.delete(f"/v1/files/{twin['id']}").status_code == 200
    monkeypatch.setattr(files_service, "get_file", lambda *_: stale)
    late = client.delete(f"/v1/files/{twin['id']}")
    assert late.status_code == 404
    assert late.json()["error"]["param"] == "file_id"
    assert len(_audit("file.delete", twin["id"])) == 1
