"""`Idempotency-Key` on generations: a retry gets the first request's job."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.idempotency.models import IdempotencyKey
from shared.idempotency.service import purge_expired
from tests.service.conftest import Service

ASYNC = {"Prefer": "respond-async"}


def post(service: Service, key: str, body: dict[str, Any], **headers: str) -> Any:
    with service.client(headers.pop("api_key", None)) as client:
        return client.post(
            "/v1/images/generations", json=body, headers={"Idempotency-Key": key, **headers}
        )


def test_a_retry_with_the_same_key_and_body_returns_the_same_job(service: Service) -> None:
    key, body = str(uuid.uuid4()), {"prompt": "idempotent", "size": "64x64", "n": 2}
    first = post(service, key, body, **ASYNC)
    again = post(service, key, {"size": "64x64", "n": 2, "prompt": "idempotent"}, **ASYNC)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    # Waiting (the default), the retry answers with that job's images.
    done = service.wait_for(f"/v1/images/jobs/{first.json()['id']}", lambda j: "result" in j)
    sync = post(service, key, body)
    assert sync.status_code == 200
    paths = [item["url"].split("?")[0] for item in sync.json()["data"]]
    assert paths == [item["url"].split("?")[0] for item in done["result"]["data"]]


def test_the_same_key_with_another_body_is_409(service: Service) -> None:
    key = str(uuid.uuid4())
    assert post(service, key, {"prompt": "one", "size": "64x64"}, **ASYNC).status_code == 202
    other = post(service, key, {"prompt": "two", "size": "64x64"}, **ASYNC)
    assert other.status_code == 409
    error = other.json()["error"]
    assert (error["code"], error["param"]) == ("idempotency_key_reused", "Idempotency-Key")


def test_keys_are_scoped_to_the_project(service: Service) -> None:
    key, body = str(uuid.uuid4()), {"prompt": "scoped", "size": "64x64"}
    mine = post(service, key, body, **ASYNC).json()["id"]
    theirs = post(service, key, body, api_key=service.create_key("idem-other"), **ASYNC)
    assert theirs.status_code == 202
    assert theirs.json()["id"] != mine


def test_after_24_hours_the_key_makes_a_new_job(service: Service) -> None:
    key, body = str(uuid.uuid4()), {"prompt": "expiring", "size": "64x64"}
    first = post(service, key, body, **ASYNC).json()["id"]
    with unit_of_work() as session:
        session.execute(
            sa.update(IdempotencyKey)
            .where(IdempotencyKey.key == key)  # type: ignore[arg-type]
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    later = post(service, key, body, **ASYNC).json()["id"]
    assert later != first
    assert post(service, key, body, **ASYNC).json()["id"] == later


def test_twins_sent_at_once_make_one_job(service: Service) -> None:
    key, body = str(uuid.uuid4()), {"prompt": "twins", "size": "64x64"}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(service, key, body, **ASYNC), range(6)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1


def test_a_key_too_long_is_refused_naming_the_header(service: Service) -> None:
    resp = post(service, "k" * 256, {"prompt": "long key"}, **ASYNC)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "Idempotency-Key"


def test_a_batch_retried_with_its_key_is_the_same_batch(service: Service) -> None:
    key = str(uuid.uuid4())
    body = {"prompts": ["one", "two"], "size": "64x64"}
    with service.client() as client:
        first = client.post("/v1/images/batches", json=body, headers={"Idempotency-Key": key})
        again = client.post("/v1/images/batches", json=body, headers={"Idempotency-Key": key})
        other = client.post(
            "/v1/images/batches",
            json={"prompts": ["three"], "size": "64x64"},
            headers={"Idempotency-Key": key},
        )
        listed = client.get("/v1/batches", params={"limit": 100}).json()["data"]
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert sum(1 for b in listed if b["id"] == first.json()["id"]) == 1
    assert other.status_code == 409


def test_twin_batches_sent_at_once_make_one_batch(service: Service) -> None:
    key, body = str(uuid.uuid4()), {"prompts": ["twin"], "size": "64x64"}

    def send(_: int) -> Any:
        with service.client() as client:
            return client.post("/v1/images/batches", json=body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(4)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["id"] for a in answers}) == 1


def test_an_upload_retried_with_its_key_is_the_same_file(service: Service) -> None:
    key = str(uuid.uuid4())
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": {}}\n'

    def upload(content: bytes) -> Any:
        with service.client() as client:
            return client.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": ("in.jsonl", content, "application/jsonl")},
                headers={"Idempotency-Key": key},
            )

    first, again, other = upload(line), upload(line), upload(line * 2)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 409


def test_the_sweeper_purges_keys_past_24_hours(service: Service) -> None:
    key = str(uuid.uuid4())
    post(service, key, {"prompt": "purged", "size": "64x64"}, **ASYNC)
    with unit_of_work() as session:
        session.execute(
            sa.update(IdempotencyKey)
            .where(IdempotencyKey.key == key)  # type: ignore[arg-type]
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    with unit_of_work() as session:
        assert purge_expired(session) >= 1
        assert session.scalar(sa.select(IdempotencyKey).where(IdempotencyKey.key == key)) is None  # type: ignore[arg-type]


def test_a_refused_request_does_not_use_up_its_key(service: Service) -> None:
    key = str(uuid.uuid4())
    with service.client() as client:
        bad = client.post(
            "/v1/batches",
            json={"input_file_id": "file_nope", "endpoint": "", "completion_window": "24h"},
            headers={"Idempotency-Key": key},
        )
        other = client.post(
            "/v1/batches",
            json={"input_file_id": "file_other", "endpoint": "", "completion_window": "24h"},
            headers={"Idempotency-Key": key},
        )
        fine = post(service, key, {"prompt": "after refusals", "size": "64x64"}, **ASYNC)
    assert bad.status_code == other.status_code == 400
    assert fine.status_code == 202
