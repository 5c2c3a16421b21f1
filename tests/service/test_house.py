"""The house rules, seen from outside: one transaction per request, heavy batch work
enqueued, response schemas on every route, one error shape."""

from __future__ import annotations

import re

import sqlalchemy as sa

from shared.batches.models import Batch
from shared.core.db import unit_of_work
from tests.service.conftest import Service


def count_batches() -> int:
    with unit_of_work() as session:
        return int(session.execute(sa.select(sa.func.count()).select_from(Batch)).scalar_one())


def test_a_request_that_fails_after_a_write_leaves_nothing(service: Service) -> None:
    """The native batch is flushed before its second line is refused: the request's
    rollback takes the batch with it."""
    before = count_batches()
    resp = service.client().post(
        "/v1/images/batches",
        json={"requests": [{"prompt": "a", "custom_id": "x"}, {"prompt": "b", "custom_id": "x"}]},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "requests.1.custom_id"
    assert count_batches() == before


def test_cancelling_a_batch_answers_at_once_and_the_worker_finalizes_it(
    service: Service,
) -> None:
    client = service.client()
    with service.paused():  # the lines stay pending until cancelled
        batch = client.post(
            "/v1/images/batches", json={"prompts": ["one", "two"], "size": "64x64"}
        ).json()
        cancelled = client.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelling"  # finalizing is the worker's job
    done = service.wait_for(f"/v1/batches/{batch['id']}", lambda b: b["status"] == "cancelled")
    assert done["status"] == "cancelled"
    assert done["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    errors = client.get(f"/v1/files/{done['error_file_id']}/content").text.splitlines()
    assert len(errors) == 2


def test_every_answer_of_every_route_has_a_schema(service: Service) -> None:
    """Every documented answer, JSON or not (a stream, image bytes, JSON lines),
    names its media type and a schema; POST bodies too, multipart forms included."""
    spec = service.client().get("/openapi.json").json()
    missing = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            for code, answer in op["responses"].items():
                content = answer.get("content")
                if not content:
                    missing.append(f"{method.upper()} {path} {code}: no content")
                for media, body in (content or {}).items():
                    if not body.get("schema"):
                        missing.append(f"{method.upper()} {path} {code} {media}: no schema")
    assert missing == []
    files = spec["paths"]["/v1/files"]["get"]["responses"]["200"]["content"]
    assert files["application/json"]["schema"]["$ref"].endswith("ListPage_FileObject_")
    events = spec["paths"]["/v1/images/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert set(events["content"]) == {"text/event-stream"}
    edit = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    form = edit["multipart/form-data"]["schema"]["properties"]
    assert form["image"]["items"]["format"] == "binary"
    assert {"prompt", "mask", "input_fidelity", "partial_images"} <= set(form)


def test_the_openai_surface_documents_400_not_422(service: Service) -> None:
    """Schema errors answer 400 in OpenAI's shape there; only the Weave surface keeps
    FastAPI's 422, as its reference server does."""
    spec = service.client().get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            weave = path.startswith(("/image/", "/call/", "/calls/"))
            assert ("422" in op["responses"]) == weave, f"{method} {path}"
            if path.startswith("/v1/"):
                bad = op["responses"]["400"]["content"]["application/json"]["schema"]
                assert bad["$ref"].endswith("/ErrorResponse"), f"{method} {path}"
    resp = service.client().post("/v1/images/generations", json={"prompt": 3})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "prompt"


def test_every_field_of_every_schema_is_described(service: Service) -> None:
    """``/docs`` explains each field. FastAPI's own ``ValidationError`` and
    ``HTTPValidationError`` (the Weave surface's 422, as its reference server has
    them) are not ours to describe."""
    spec = service.client().get("/openapi.json").json()
    theirs = {"ValidationError", "HTTPValidationError"}
    bare = [
        f"{name}.{field}"
        for name, schema in spec["components"]["schemas"].items()
        if name not in theirs
        for field, prop in (schema.get("properties") or {}).items()
        if not prop.get("description")
    ]
    assert bare == []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            for param in op.get("parameters", []):
                if param["in"] in ("path", "header"):
                    continue  # ids and well-known headers
                assert param.get("description"), f"{method} {path} ?{param['name']}"


def test_errors_share_one_shape(service: Service) -> None:
    client = service.client()
    not_found = client.get("/v1/batches/batch_nope").json()["error"]
    invalid = client.post("/v1/images/generations", json={"prompt": "p", "n": 99}).json()["error"]
    anonymous = service.anonymous().get("/v1/images/jobs").json()["error"]
    for body in (not_found, invalid, anonymous):
        assert set(body) == {"message", "type", "param", "code"}
    assert not_found["code"] == "not_found"
    assert invalid["param"] == "n"
    assert anonymous["code"] == "missing_api_key"


def test_readyz_checks_the_database_broker_and_storage(service: Service) -> None:
    resp = service.anonymous().get("/readyz")
    assert resp.status_code == 200
    assert resp.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
    }


def test_metrics_show_requests_by_route_and_the_work_in_sql(service: Service) -> None:
    with service.client() as client:
        assert client.post("/v1/images/generations", json={"prompt": "metered"}).status_code == 200
        with service.paused():
            client.post(
                "/v1/images/generations",
                headers={"Prefer": "respond-async"},
                json={"model": "parked", "prompt": "waiting", "size": "64x64"},
            )
            text = (
                service.anonymous()
                .get("/metrics", headers={"Authorization": "Bearer admin-service-key"})
                .text
            )
        refused = service.anonymous().get("/metrics")
    route = 'method="POST",route="/v1/images/generations",status="200"'
    assert f"imagegen_http_request_duration_seconds_count{{{route}}}" in text
    assert 'imagegen_queue_depth{queue="parked"}' in text
    assert 'imagegen_jobs{model="parked",status="queued"}' in text
    assert 'imagegen_jobs_finished_total{model="procedural",status="succeeded"}' in text
    assert refused.status_code == 401  # the admin key is set here: scrapes need it


def test_a_request_id_is_answered_recorded_on_the_job_and_sane(service: Service) -> None:
    with service.client() as client:
        given = client.post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async", "X-Request-Id": "trace-42.a_b"},
            json={"prompt": "request id", "size": "64x64"},
        )
        made_up = client.get("/healthz", headers={"X-Request-Id": "no spaces allowed"})
        job = client.get(f"/v1/images/jobs/{given.json()['id']}").json()
    assert given.headers["x-request-id"] == "trace-42.a_b"
    assert job["request_id"] == "trace-42.a_b"
    assert made_up.headers["x-request-id"].startswith("req_")


def test_project_limits_are_refused_where_they_cannot_be_enforced(service: Service) -> None:
    """In-process there is no Redis, where limits are counted: accepting them would
    be a promise nobody keeps."""
    admin = {"Authorization": "Bearer admin-service-key"}
    created = service.anonymous().post(
        "/v1/admin/projects", headers=admin, json={"name": "limited", "images_per_day": 5}
    )
    assert created.status_code == 400
    error = created.json()["error"]
    assert error["param"] == "images_per_day"
    assert "IMAGEGEN_REDIS_URL" in error["message"]
    plain = service.anonymous().post("/v1/admin/projects", headers=admin, json={"name": "plain"})
    assert plain.status_code == 200


def test_docs_work_offline(service: Service) -> None:
    client = service.anonymous()
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert assets
    assert not [a for a in assets if a.startswith(("http:", "https:", "//"))]  # no CDN
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert client.get("/openapi.json").status_code == 200
