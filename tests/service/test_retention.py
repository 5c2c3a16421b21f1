"""Retention (issue 29) through the whole service in one process, on local storage:
a project's retention and a request's own shorter life expire images (the job stays
readable, its entries ``expired``, its file URL 410), Files ``expires_after``, job
rows past their retention removed, the purge killed halfway and run again, orphans
swept but not young ones. Time is the purge's ``now`` argument: no sleeps."""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlmodel import col, select
from typer.testing import CliRunner

from cli.main import app
from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.storage import LocalStorage, Storage, StoredObject, get_storage
from shared.jobs import views
from shared.jobs.models import Image, Job
from shared.projects.models import Project
from shared.retention import purge
from shared.retention.orphans import Cursor, sweep_orphans
from shared.retention.purge import purge_once
from shared.traces.models import Call
from shared.webhooks.models import DeliveryStatus, WebhookDelivery
from tests.service.conftest import Service

ADMIN = {"Authorization": "Bearer admin-service-key"}
ASYNC = {"Prefer": "respond-async"}
DAY = timedelta(days=1)


def project_client(service: Service, name: str) -> TestClient:
    return service.client(service.create_key(name))


def set_retention(service: Service, project: str, **fields: Any) -> dict[str, Any]:
    resp = service.anonymous().patch(f"/v1/admin/projects/{project}", json=fields, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def generate(
    service: Service, client: TestClient, headers: dict[str, str] | None = None, n: int = 2
) -> dict[str, Any]:
    resp = client.post(
        "/v1/images/generations",
        headers={"Prefer": "respond-async", **(headers or {})},
        json={"prompt": "a heron", "size": "64x64", "n": n},
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/images/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def image_keys(job_id: str) -> list[str]:
    with unit_of_work() as session:
        return list(session.exec(select(Image.storage_key).where(col(Image.job_id) == job_id)))


def stored(storage: Storage, key: str) -> bool:
    return any(obj.key == key for obj in storage.scan(key))


def fetch(client: TestClient, url: str) -> int:
    parsed = urlparse(url)
    return client.get(f"{parsed.path}?{parsed.query}").status_code


def test_project_retention_expires_images_and_the_job_stays_readable(service: Service) -> None:
    client = project_client(service, "retention-images")
    body = set_retention(service, "retention-images", image_retention_seconds=3600)
    assert body["image_retention_seconds"] == 3600
    assert body["job_retention_seconds"] is None
    job = generate(service, client)
    url = job["result"]["data"][0]["url"]
    keys = image_keys(job["id"])
    storage = get_storage()
    assert all(stored(storage, k) for k in keys)

    # Within its time: an hour less a minute on, nothing is touched.
    assert purge_once(storage, utcnow() + timedelta(minutes=59)).images == 0
    assert all(stored(storage, k) for k in keys)

    done = purge_once(storage, utcnow() + timedelta(hours=2))
    assert done.images >= 2
    assert not any(stored(storage, k) for k in keys)
    read = client.get(f"/v1/images/jobs/{job['id']}")
    assert read.status_code == 200
    assert read.json()["status"] == "succeeded"
    assert read.json()["result"]["data"] == [{"expired": True}, {"expired": True}]
    # The URL handed out before: 410 in our error shape.
    resp = client.get(urlparse(url).path + "?" + urlparse(url).query)
    assert resp.status_code == 410
    assert resp.json()["error"]["code"] == "image_expired"


def test_retention_is_validated_and_null_means_forever(service: Service) -> None:
    service.create_key("retention-checks")
    admin = service.anonymous()
    bad = admin.patch(
        "/v1/admin/projects/retention-checks", json={"image_retention_seconds": 5}, headers=ADMIN
    )
    assert bad.status_code == 400
    assert "image_retention_seconds" in bad.text
    set_retention(service, "retention-checks", job_retention_seconds=86400)
    body = set_retention(service, "retention-checks", job_retention_seconds=None)
    assert body["job_retention_seconds"] is None
    events = admin.get(
        "/v1/admin/audit", params={"action": "retention.update"}, headers=ADMIN
    ).json()["data"]
    mine = [e for e in events if e["details"]["project"] == "retention-checks"]
    assert {e["target"] for e in mine} == {body["id"]}
    assert [e["details"]["changes"] for e in mine] == [
        {"job_retention_seconds": {"from": 86400, "to": None}},
        {"job_retention_seconds": {"from": None, "to": 86400}},
    ]


def test_the_cli_sets_retention_in_days(service: Service) -> None:
    key = service.create_key("retention-cli")
    runner = CliRunner()
    args = ["projects", "set-retention", "retention-cli", "--images", "7d", "--files", "36h"]
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    listed = service.anonymous().get("/v1/admin/projects", headers=ADMIN).json()["data"]
    project = next(p for p in listed if p["name"] == "retention-cli")
    assert project["image_retention_seconds"] == 7 * 86400
    assert project["file_retention_seconds"] == 36 * 3600
    assert project["job_retention_seconds"] is None
    # The project's own key sees it in its usage (what the console's usage page shows).
    usage = service.client(key).get("/v1/usage").json()
    assert usage["retention"] == {
        "image_retention_seconds": 7 * 86400,
        "file_retention_seconds": 36 * 3600,
        "job_retention_seconds": None,
    }
    listed_json = runner.invoke(app, ["projects", "list", "--json"]).output.splitlines()
    row = next(json.loads(r) for r in listed_json if '"retention-cli"' in r)
    assert row["image_retention_seconds"] == 7 * 86400
    forever = ["projects", "set-retention", "retention-cli", "--images", "forever"]
    assert runner.invoke(app, forever).exit_code == 0
    bad = runner.invoke(app, ["projects", "set-retention", "retention-cli", "--jobs", "soon"])
    assert bad.exit_code == 1
    assert "--jobs" in bad.output


def test_a_requests_own_shorter_life(service: Service) -> None:
    client = project_client(service, "retention-header")
    set_retention(service, "retention-header", image_retention_seconds=86400)
    short = generate(service, client, {"Image-Expires-After": "10m"}, n=1)
    capped = generate(service, client, {"Image-Expires-After": "1000h"}, n=1)
    plain = generate(service, client, n=1)
    with unit_of_work() as session:
        rows = {j.id: j for j in session.exec(select(Job).where(col(Job.project_id).is_not(None)))}
    now = utcnow()
    assert rows[short["id"]].images_expire_at is not None
    assert abs((rows[short["id"]].images_expire_at - now).total_seconds() - 600) < 30  # type: ignore[operator]
    # Longer than the project's retention: capped at it, not refused.
    assert abs((rows[capped["id"]].images_expire_at - now).total_seconds() - 86400) < 30  # type: ignore[operator]
    assert rows[plain["id"]].images_expire_at is None

    storage = get_storage()
    purge_once(storage, now + timedelta(minutes=11))
    assert client.get(f"/v1/images/jobs/{short['id']}").json()["result"]["data"] == [
        {"expired": True}
    ]
    for job in (capped, plain):
        data = client.get(f"/v1/images/jobs/{job['id']}").json()["result"]["data"]
        assert "url" in data[0]
        assert all(stored(storage, k) for k in image_keys(job["id"]))

    bad = client.post(
        "/v1/images/generations",
        headers={"Image-Expires-After": "soon"},
        json={"prompt": "x", "size": "64x64"},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "Image-Expires-After"


def test_files_expires_after(service: Service) -> None:
    client = project_client(service, "retention-files")
    upload = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", b"{}\n")},
        data={
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "3600",
        },
    )
    assert upload.status_code == 200, upload.text
    file = upload.json()
    assert file["expires_at"] == file["created_at"] + 3600
    kept = client.post("/v1/files", files={"file": ("k.jsonl", b"{}\n")}, data={"purpose": "batch"})
    assert kept.json()["expires_at"] is None
    for fields in (
        {"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"},
        {"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
        {"expires_after[seconds]": "3600"},
    ):
        resp = client.post(
            "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch", **fields}
        )
        assert resp.status_code == 400, fields
        assert resp.json()["error"]["param"].startswith("expires_after")

    storage = get_storage()
    key = f"{file['id']}"
    purged = purge_once(storage, utcnow() + timedelta(hours=2))
    assert purged.files >= 1
    assert client.get(f"/v1/files/{file['id']}").status_code == 404
    listed = [f["id"] for f in client.get("/v1/files").json()["data"]]
    assert file["id"] not in listed
    assert kept.json()["id"] in listed
    assert not any(o.key.endswith(key) for o in storage.scan(""))


def test_job_rows_past_their_retention_are_removed(service: Service) -> None:
    client = project_client(service, "retention-jobs")
    set_retention(service, "retention-jobs", job_retention_seconds=3600)
    job = generate(service, client)
    keys = image_keys(job["id"])
    storage = get_storage()
    assert purge_once(storage, utcnow() + timedelta(minutes=30)).jobs == 0
    assert client.get(f"/v1/images/jobs/{job['id']}").status_code == 200

    # Past its key's 24 hours too (a retry with it gets the job till then).
    assert purge_once(storage, utcnow() + timedelta(hours=25)).jobs >= 1
    assert client.get(f"/v1/images/jobs/{job['id']}").status_code == 404
    assert not any(stored(storage, k) for k in keys)
    with unit_of_work() as session:
        assert session.exec(select(Call).where(col(Call.job_id) == job["id"])).first() is None
        assert session.exec(select(Image).where(col(Image.job_id) == job["id"])).first() is None


def finished(client: TestClient, job_id: str) -> None:
    deadline = time.monotonic() + 15
    while (job := client.get(f"/v1/images/jobs/{job_id}").json())["status"] != "succeeded":
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def test_a_job_row_outlives_its_idempotency_key_and_its_pending_webhooks(
    service: Service,
) -> None:
    """Job retention may be a minute, but an Idempotency-Key answers with its job for
    24 hours and a webhook is retried for days: the row stays until both are over."""
    client = project_client(service, "retention-keep")
    set_retention(service, "retention-keep", job_retention_seconds=60)
    key, body = str(uuid.uuid4()), {"prompt": "kept", "size": "64x64"}
    keyed = client.post(
        "/v1/images/generations", json=body, headers={"Idempotency-Key": key, **ASYNC}
    ).json()["id"]
    hook = {"webhook_url": "http://127.0.0.1:9/hook", "webhook_events": ["job.succeeded"]}
    hooked = client.post("/v1/images/generations", json={**body, **hook}, headers=ASYNC)
    hooked_id = hooked.json()["id"]
    finished(client, keyed)
    finished(client, hooked_id)
    storage = get_storage()
    now = utcnow()

    purge_once(storage, now + timedelta(hours=1))  # past the job retention only
    assert client.get(f"/v1/images/jobs/{keyed}").status_code == 200
    again = client.post(
        "/v1/images/generations", json=body, headers={"Idempotency-Key": key, **ASYNC}
    )
    assert again.json()["id"] == keyed  # the retry still gets the first job
    assert client.get(f"/v1/images/jobs/{hooked_id}").status_code == 200

    purge_once(storage, now + timedelta(hours=25))  # the key has expired
    assert client.get(f"/v1/images/jobs/{keyed}").status_code == 404
    # Its delivery is still pending (no webhook worker runs here): kept.
    assert client.get(f"/v1/images/jobs/{hooked_id}").status_code == 200
    with unit_of_work() as session:
        session.execute(
            sa.update(WebhookDelivery)
            .where(col(WebhookDelivery.job_id) == hooked_id)
            .values(status=DeliveryStatus.failed)  # its retry schedule exhausted
        )
    purge_once(storage, now + timedelta(hours=25))
    assert client.get(f"/v1/images/jobs/{hooked_id}").status_code == 404


class Killed(Exception):
    pass


def test_the_purge_killed_halfway_and_run_again_purges_exactly(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = project_client(service, "retention-kill")
    set_retention(service, "retention-kill", image_retention_seconds=3600)
    jobs = [generate(service, client, n=2) for _ in range(3)]
    young = project_client(service, "retention-kill-young")
    set_retention(service, "retention-kill-young", image_retention_seconds=30 * 86400)
    kept = generate(service, young, n=1)
    storage = get_storage()
    monkeypatch.setattr(purge, "CHUNK", 2)  # three chunks of this project's images

    calls = {"n": 0}
    real_delete = storage.delete

    def dying_delete(keys: list[str]) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # killed after the first chunk, its objects half gone
            real_delete(keys[:1])
            raise Killed()
        return real_delete(keys)

    monkeypatch.setattr(storage, "delete", dying_delete)
    later = utcnow() + timedelta(hours=2)
    with pytest.raises(Killed):
        purge_once(storage, later)
    with unit_of_work() as session:
        marked = session.exec(
            select(Image).where(col(Image.job_id).in_([j["id"] for j in jobs]))
        ).all()
    assert sum(1 for i in marked if i.expired_at is not None) == 2  # the first chunk only

    monkeypatch.setattr(storage, "delete", real_delete)
    purge_once(storage, later)
    for job in jobs:
        assert not any(stored(storage, k) for k in image_keys(job["id"]))
        data = client.get(f"/v1/images/jobs/{job['id']}").json()["result"]["data"]
        assert data == [{"expired": True}, {"expired": True}]
    # Within its time: untouched by either run.
    assert all(stored(storage, k) for k in image_keys(kept["id"]))
    assert "url" in young.get(f"/v1/images/jobs/{kept['id']}").json()["result"]["data"][0]


def test_orphans_are_swept_but_not_young_ones(service: Service) -> None:
    client = project_client(service, "retention-orphans")
    job = generate(service, client, n=1)
    storage = get_storage()
    assert isinstance(storage, LocalStorage)
    project = image_keys(job["id"])[0].split("/")[0]
    old = time.time() - 3 * 86400
    orphan_keys = [
        f"{project}/job_gone/0.png",  # an image of no job (a failed job's write)
        f"{project}/job_gone/input-0.png",  # an idempotent replay's input
        f"{project}/{job['id']}/7.png",  # an index the job has no row for
        f"{project}/files/file_gone",  # a file never recorded
        f"{project}/{job['id']}/0.png.tmp",  # a crashed upload
    ]
    for key in orphan_keys:
        path = storage.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    owned = image_keys(job["id"])[0]
    os.utime(storage.root / owned, (old, old))
    young = f"{project}/job_new/0.png"  # maybe a job whose row is not committed yet
    storage.put(young, b"y", "image/png")

    Cursor._local = ""
    swept = sweep_orphans(storage, min_age_seconds=86400, limit=1_000_000)
    assert swept.finished_round, swept
    assert swept.deleted == len(orphan_keys), swept
    left = {o.key for o in storage.scan(f"{project}/")}
    assert not left & set(orphan_keys)
    assert owned in left
    assert young in left
    assert (
        fetch(client, client.get(f"/v1/images/jobs/{job['id']}").json()["result"]["data"][0]["url"])
        == 200
    )


def test_the_orphan_scan_is_bounded_and_resumes(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passes of a few objects each cover every project's objects once: each pass
    lists from where the last stopped (not from the project's start again), in the
    same order as S3's listing."""
    storage = get_storage()
    assert isinstance(storage, LocalStorage)
    service.create_key("retention-scan")
    with unit_of_work() as session:
        projects = list(session.exec(select(Project.id)))
        mine = session.exec(select(Project.id).where(Project.name == "retention-scan")).one()
    # Young objects (left alone), some named so that a folder walk in name order is
    # not key order ('-' sorts before '/').
    for key in ("a/0.png", "a-b/0.png", "a0/0.png", "b/1.png", "b/10.png", "b/2.png", "c"):
        storage.put(f"{mine}/{key}", b"x", "image/png")
    every = sorted(o.key for p in projects for o in storage.scan(f"{p}/"))
    listed: list[str] = []
    real_scan = storage.scan

    def scan(prefix: str = "", start_after: str = "") -> Iterator[StoredObject]:
        for obj in real_scan(prefix, start_after=start_after):
            listed.append(obj.key)
            yield obj

    monkeypatch.setattr(storage, "scan", scan)
    Cursor._local = ""
    first = sweep_orphans(storage, min_age_seconds=86400, limit=3)
    assert first.examined == 3
    assert not first.finished_round
    assert Cursor._local != ""
    passes = [first]
    while not passes[-1].finished_round:
        assert len(passes) < 10
        passes.append(sweep_orphans(storage, min_age_seconds=86400, limit=len(every) // 4 + 1))
    assert Cursor._local == ""
    assert listed == every  # each object listed once, in key order, across passes
    assert sum(p.examined for p in passes) == len(every)


def test_batch_files_take_their_batchs_output_expires_after(service: Service) -> None:
    client = project_client(service, "retention-batches")
    set_retention(service, "retention-batches", file_retention_seconds=30 * 86400)
    line = '{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", '
    line += '"body": {"prompt": "a wren", "size": "64x64"}}\n'
    source = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", line.encode(), "application/jsonl")},
    ).json()
    # The input file: the project's file retention.
    assert source["expires_at"] == source["created_at"] + 30 * 86400
    body = {
        "input_file_id": source["id"],
        "endpoint": "/v1/images/generations",
        "completion_window": "24h",
    }
    bad = client.post(
        "/v1/batches", json={**body, "output_expires_after": {"anchor": "created_at", "seconds": 5}}
    )
    assert bad.status_code == 400
    assert "output_expires_after" in bad.json()["error"]["param"]
    batch = client.post(
        "/v1/batches",
        json={**body, "output_expires_after": {"anchor": "created_at", "seconds": 7200}},
    ).json()
    deadline = time.monotonic() + 15
    while (ended := client.get(f"/v1/batches/{batch['id']}").json())["status"] != "completed":
        assert time.monotonic() < deadline, ended
        time.sleep(0.02)
    output = client.get(f"/v1/files/{ended['output_file_id']}").json()
    assert output["expires_at"] == output["created_at"] + 7200

    purge_once(get_storage(), utcnow() + timedelta(hours=3))
    assert client.get(f"/v1/files/{ended['output_file_id']}").status_code == 404
    assert client.get(f"/v1/files/{ended['output_file_id']}/content").status_code == 404
    assert client.get(f"/v1/files/{source['id']}").status_code == 200


def url_expires(url: str) -> int:
    return int(parse_qs(urlparse(url).query)["expires"][0])


def test_every_view_of_an_image_honours_its_projects_retention(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its project's image retention but not purged yet, an image is expired in
    every view (SSE, a batch's line pages), and a URL handed out before (a batch's
    output file, a webhook's payload) never outlives it."""
    client = project_client(service, "retention-views")
    set_retention(service, "retention-views", image_retention_seconds=1800)
    line = '{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", '
    line += '"body": {"prompt": "a wren", "size": "64x64"}}\n'
    source = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", line.encode(), "application/jsonl")},
    ).json()
    body = {"input_file_id": source["id"], "endpoint": "/v1/images/generations"}
    batch = client.post("/v1/batches", json={**body, "completion_window": "24h"}).json()
    hook = {"webhook_url": "http://127.0.0.1:9/hook", "webhook_events": ["job.succeeded"]}
    job = client.post(
        "/v1/images/generations", json={"prompt": "a kite", "size": "64x64", **hook}, headers=ASYNC
    ).json()["id"]
    finished(client, job)
    deadline = time.monotonic() + 15
    while (ended := client.get(f"/v1/batches/{batch['id']}").json())["status"] != "completed":
        assert time.monotonic() < deadline, ended
        time.sleep(0.02)
    half_an_hour = time.time() + 1800 + 5  # URLs are presigned for an hour otherwise
    output = client.get(f"/v1/files/{ended['output_file_id']}/content").text
    written = json.loads(output)["response"]["body"]["data"][0]["url"]
    assert url_expires(written) <= half_an_hour  # not the batch URLs' week
    with unit_of_work() as session:
        payload = session.exec(
            select(WebhookDelivery.payload).where(col(WebhookDelivery.job_id) == job)
        ).one()
    assert url_expires(payload["data"]["result"]["data"][0]["url"]) <= half_an_hour

    later = utcnow() + timedelta(hours=2)
    monkeypatch.setattr(views, "utcnow", lambda: later)
    items = client.get(f"/v1/images/batches/{batch['id']}/items").json()["data"]
    assert items[0]["response"]["body"]["data"] == [{"expired": True}]
    with client.stream("GET", f"/v1/images/jobs/{job}/events") as stream:
        frames = [json.loads(t[6:]) for t in stream.iter_lines() if t.startswith("data: ")]
    assert frames[0]["status"] == "succeeded"
    assert frames[0]["result"]["data"] == [{"expired": True}]


def test_a_canceled_edits_inputs_expire_with_the_project_image_retention(
    service: Service,
) -> None:
    """An edit that made no image (canceled, failed) still stored its inputs: they
    are deleted once its project's image retention has passed since it ended, and
    the project's stored bytes drop; the next pass has nothing to redo."""
    client = project_client(service, "retention-inputs")
    set_retention(service, "retention-inputs", image_retention_seconds=3600)
    picture = io.BytesIO()
    PILImage.new("RGB", (64, 64), (200, 10, 10)).save(picture, format="PNG")
    with service.paused():
        edit = client.post(
            "/v1/images/edits",
            headers=ASYNC,
            data={"prompt": "make it blue", "size": "64x64"},
            files={"image": ("in.png", picture.getvalue(), "image/png")},
        )
        assert edit.status_code == 202, edit.text
        job_id = edit.json()["id"]
        assert client.post(f"/v1/images/jobs/{job_id}/cancel").json()["status"] == "canceled"
    storage = get_storage()
    inputs = [o.key for o in storage.scan("") if f"/{job_id}/input-" in o.key]
    assert len(inputs) == 1
    assert client.get("/v1/usage").json()["storage"]["inputs_bytes"] > 0

    assert purge_once(storage, utcnow() + timedelta(minutes=59)).inputs == 0  # in its time
    assert stored(storage, inputs[0])
    done = purge_once(storage, utcnow() + timedelta(hours=2))
    assert done.inputs == 1
    assert not stored(storage, inputs[0])
    assert client.get("/v1/usage").json()["storage"]["inputs_bytes"] == 0
    assert client.get(f"/v1/images/jobs/{job_id}").json()["status"] == "canceled"
    assert purge_once(storage, utcnow() + timedelta(hours=2)).inputs == 0


def test_a_sync_answers_urls_never_outlive_the_projects_image_retention(
    service: Service,
) -> None:
    client = project_client(service, "retention-sync")
    set_retention(service, "retention-sync", image_retention_seconds=120)
    answer = client.post("/v1/images/generations", json={"prompt": "a tern", "size": "64x64"})
    assert answer.status_code == 200, answer.text
    # Two minutes, not the URLs' hour: the image is purged then.
    assert url_expires(answer.json()["data"][0]["url"]) <= time.time() + 120 + 5
