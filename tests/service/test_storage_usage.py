"""Storage accounting and the storage quota (issue 29), in-process on local files:
a project's ``storage_bytes`` (``GET /v1/usage``, ``/metrics``, ``imagegen usage``) is
exactly what storage holds under it: its images, an edit's uploads and mask, its
files; it falls when a job is deleted, an image expires or a file is deleted. A
project at its quota is refused every kind of new work with 429
``storage_quota_exceeded``, and taken again once the quota is raised or removed; a
project without a quota costs no query at all."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import api.routes.metrics
import cli.usage
from cli.main import app
from shared.core.clock import utcnow
from shared.core.db import get_engine
from shared.core.ids import new_id
from shared.core.storage import get_storage
from shared.quota import STORED
from shared.retention.purge import purge_once
from tests.service.conftest import BASE_URL, Service

ADMIN = {"Authorization": "Bearer admin-service-key"}


def _png(colour: tuple[int, ...], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (64, 64), colour).save(out, "PNG")
    return out.getvalue()


class Project:
    """A fresh project of the service, its key's client and the admin's."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.name = new_id("stored")
        self.key = service.create_key(self.name)
        self.client = service.client(self.key)
        self.admin = TestClient(service.app, base_url=BASE_URL, headers=ADMIN)
        self.id = self._id()

    def _id(self) -> str:
        rows = self.admin.get("/v1/admin/projects").json()["data"]
        return str(next(p["id"] for p in rows if p["name"] == self.name))

    def usage(self) -> dict[str, Any]:
        resp = self.client.get("/v1/usage")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def on_disk(self) -> int:
        """What storage really holds under the project."""
        return sum(obj.size for obj in get_storage().scan(f"{self.id}/"))

    def generate(self, **headers: str) -> dict[str, Any]:
        answer = self.client.post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async", **headers},
            json={"prompt": "a gull", "size": "64x64", "n": 2},
        )
        assert answer.status_code == 202, answer.text
        return self.finished(answer.json()["id"])

    def edit(self, image: bytes, mask: bytes, **headers: str) -> dict[str, Any]:
        answer = self.client.post(
            "/v1/images/edits",
            headers={"Prefer": "respond-async", **headers},
            files={"image": ("in.png", image, "image/png"), "mask": ("m.png", mask, "image/png")},
            data={"prompt": "make it blue", "size": "64x64", "model": "procedural"},
        )
        assert answer.status_code == 202, answer.text
        return self.finished(answer.json()["id"])

    def finished(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.client.get(f"/v1/images/jobs/{job_id}").json()
            if job["status"] == "succeeded":
                return job
            time.sleep(0.02)
        raise AssertionError(f"{job_id} did not finish")

    def set_quota(self, quota: int | None) -> None:
        resp = self.admin.patch(
            f"/v1/admin/projects/{self.name}", json={"storage_quota_bytes": quota}
        )
        assert resp.status_code == 200, resp.text


@pytest.fixture
def project(service: Service) -> Iterator[Project]:
    STORED.forget()
    yield Project(service)
    STORED.forget()


def test_storage_bytes_are_exactly_what_storage_holds(project: Project) -> None:
    empty = project.usage()
    assert empty["storage_bytes"] == 0
    assert empty["storage"] == {"images_bytes": 0, "inputs_bytes": 0, "files_bytes": 0}
    assert empty["storage_quota_bytes"] is None

    generated = project.generate()
    image, mask = _png((200, 10, 10)), _png((0, 0, 0, 0), "RGBA")
    edited = project.edit(image, mask, **{"Image-Expires-After": "1m"})
    upload = b'{"a": 1}\n' * 137
    made = project.client.post(
        "/v1/files", files={"file": ("notes.jsonl", upload)}, data={"purpose": "user_data"}
    )
    assert made.status_code == 200, made.text

    usage = project.usage()
    assert usage["storage"]["inputs_bytes"] == len(image) + len(mask)
    assert usage["storage"]["files_bytes"] == len(upload)
    assert usage["storage"]["images_bytes"] > 0
    assert usage["storage_bytes"] == sum(usage["storage"].values()) == project.on_disk()

    # A deleted job's images leave the count with the objects.
    assert project.client.delete(f"/v1/images/jobs/{generated['id']}").status_code == 200
    after_delete = project.usage()
    assert after_delete["storage_bytes"] == project.on_disk() < usage["storage_bytes"]

    # The edit's images expire (its own life, a minute): they and its inputs go.
    purge_once(get_storage(), now=utcnow() + timedelta(minutes=2))
    after_expiry = project.usage()
    assert after_expiry["storage"]["inputs_bytes"] == 0
    assert after_expiry["storage"]["images_bytes"] == 0
    assert after_expiry["storage_bytes"] == project.on_disk() == len(upload)
    assert edited["id"]

    assert project.client.delete(f"/v1/files/{made.json()['id']}").status_code == 200
    # A deleted file is no longer the project's, and its object is gone at once.
    assert project.usage()["storage_bytes"] == 0 == project.on_disk()


def test_metrics_and_the_cli_say_the_same_bytes(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.generate()
    stored = project.usage()["storage_bytes"]
    assert stored > 0
    api.routes.metrics.STORAGE.forget()
    text = project.admin.get("/metrics").text
    line = f'imagegen_project_storage_bytes{{project="{project.name}",project_id="{project.id}"}}'
    values = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
    assert values == [stored]

    monkeypatch.setattr(cli.usage, "connect", lambda _url, _key: project.client)
    out = CliRunner().invoke(app, ["usage"], env={"COLUMNS": "200"}).stdout
    assert f"stored: {stored} bytes (no quota)" in out
    report = json.loads(CliRunner().invoke(app, ["usage", "--json"]).stdout)
    assert report["storage_bytes"] == stored


def _refused(resp: Any) -> None:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "storage_quota_exceeded"
    assert error["type"] == "insufficient_quota"
    assert resp.headers["x-should-retry"] == "false"


def test_a_project_at_its_quota_is_refused_new_work_until_it_is_raised(
    project: Project,
) -> None:
    project.generate()
    stored = project.usage()["storage_bytes"]
    project.set_quota(stored)  # reached
    assert project.usage()["storage_quota_bytes"] == stored
    client = project.client
    image = _png((200, 10, 10))

    _refused(client.post("/v1/images/generations", json={"prompt": "a gull", "size": "64x64"}))
    _refused(
        client.post(
            "/v1/images/edits",
            files={"image": ("in.png", image, "image/png")},
            data={"prompt": "blue", "model": "procedural"},
        )
    )
    _refused(
        client.post(
            "/v1/images/variations",
            files={"image": ("in.png", image, "image/png")},
            data={"model": "procedural"},
        )
    )
    _refused(
        client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"})
    )
    _refused(
        client.post(
            "/v1/batches",
            json={
                "input_file_id": "file_x",
                "endpoint": "/v1/images/generations",
                "completion_window": "24h",
            },
        )
    )
    _refused(client.post("/v1/images/batches", json={"requests": [{"prompt": "a gull"}]}))
    weave = client.post(
        "/image/create",
        json={
            "project_id": project.name,
            "inputs": {"model": "procedural", "prompt": "a gull", "size": "64x64"},
        },
    )
    assert weave.status_code == 429  # in the Weave surface's own shape
    assert "storage quota" in weave.json()["detail"]
    assert project.on_disk() == stored  # nothing refused was stored (no edit uploads)
    # Reading and deleting go on: the way out of a full quota.
    assert client.get("/v1/usage").status_code == 200

    project.set_quota(stored + 10**9)
    project.generate()
    project.set_quota(None)
    project.generate()


def test_the_quota_is_summed_once_per_window_and_not_at_all_without_one(
    project: Project,
) -> None:
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.lower())

    engine = get_engine()
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        sums = STORED.sums
        for _ in range(3):
            project.generate()
        assert STORED.sums == sums
        assert not [s for s in statements if re.search(r"sum\(", s)]

        project.set_quota(10**12)
        for _ in range(3):
            project.generate()
        assert STORED.sums == sums + 1  # one sum, then its figure for 5 s
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
