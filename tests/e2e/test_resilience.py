"""A crash, restart or outage delays work; it never drops or duplicates it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.support.processes import S3Server, ServiceProcess, free_port, wait_for, wait_http
from tests.support.stack import Stack


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Stack]:
    s = Stack(Path(tmp_path_factory.mktemp("resilience")), s3_endpoint)
    yield s
    s.close()


def image_rows(stack: Stack, job_id: str) -> list[tuple[int, str]]:
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text('SELECT "index", storage_key FROM image WHERE job_id = :j'), {"j": job_id}
            ).all()
    finally:
        engine.dispose()
    return [(r[0], r[1]) for r in rows]


def test_worker_killed_mid_job_completes_exactly_once(own_stack: Stack) -> None:
    stack = own_stack
    with stack.client() as client:
        job = stack.submit("[slow=2] survive a kill", model="fake-fast", n=3)
        wait_for(lambda: stack.upstream.calls_for("survive a kill"), 15, "upstream call")
        assert client.get(f"/v1/images/jobs/{job['id']}").json()["status"] == "running"
        stack.kill_consumers()  # the supervising `imagegen worker` starts a new one
        done = stack.wait_job(job["id"], timeout=60)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 2
    assert len(done["result"]["data"]) == 3
    rows = image_rows(stack, job["id"])
    assert sorted(index for index, _ in rows) == [0, 1, 2]
    assert len({key for _, key in rows}) == 3


def test_redis_outage_accepts_and_later_completes_every_job(own_stack: Stack) -> None:
    stack = own_stack
    stack.redis.stop()
    sync_results: list[httpx.Response] = []

    def sync_request(i: int) -> None:
        with stack.client() as client:
            sync_results.append(
                client.post(
                    "/v1/images/generations",
                    json={
                        "model": "procedural",
                        "prompt": f"sync during outage {i}",
                        "size": "64x64",
                    },
                )
            )

    threads = [threading.Thread(target=sync_request, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    accepted = [stack.submit(f"outage {i}")["id"] for i in range(6)]
    stack.redis.start()  # same port, empty: every message published before is gone
    for job_id in accepted:
        done = stack.wait_job(job_id, timeout=60)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1
        assert len(done["result"]["data"]) == 1
    for t in threads:
        t.join(60)
    assert [r.status_code for r in sync_results] == [200, 200]
    for r in sync_results:
        assert len(r.json()["data"]) == 1


def test_database_down_answers_503_in_openai_shape(own_stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **own_stack.env,
        "IMAGEGEN_PORT": str(port),
        "IMAGEGEN_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
    }
    api = ServiceProcess(["api"], env, tmp_path / "api.log").start()
    try:
        wait_http(f"http://127.0.0.1:{port}/openapi.json")
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/images/generations",
            json={"prompt": "p"},
            headers={"Authorization": "Bearer x"},
            timeout=30,
        )
        assert resp.status_code == 503
        assert resp.headers["Retry-After"]
        assert resp.json()["error"]["code"] == "service_unavailable"
    finally:
        api.stop()


def test_sweeper_does_not_flood_a_queue_whose_messages_still_wait(stack: Stack) -> None:
    """Queued jobs older than the redelivery age are re-published only when their
    queue is empty (their message was lost), not while messages still wait."""
    with redis.Redis.from_url(stack.redis.url) as client:
        _sweeper_leaves_waiting_messages(stack, client)


def _sweeper_leaves_waiting_messages(stack: Stack, client: redis.Redis) -> None:
    before = int(client.llen("parked"))
    with stack.client() as api:
        for i in range(2):
            resp = api.post(
                "/v1/images/generations",
                headers={"Prefer": "respond-async"},
                json={"model": "parked", "prompt": f"parked {i}", "size": "64x64"},
            )
            assert resp.status_code == 202
    assert int(client.llen("parked")) == before + 2
    # Past IMAGEGEN_REDELIVER_AFTER_SECONDS (4 s in tests), several sweeps later:
    time.sleep(6)
    assert int(client.llen("parked")) == before + 2
    # Once the queue is empty (the messages are lost), they are published again.
    client.delete("parked")
    wait_for(lambda: int(client.llen("parked")) >= 2, 15, "re-publication")


def test_worker_restart_mid_batch_gives_one_result_per_line(own_stack: Stack) -> None:
    stack = own_stack
    with stack.client() as client:
        batch = client.post(
            "/v1/images/batches",
            json={
                "prompts": [f"[slow=0.2] restart {i}" for i in range(200)],
                "model": "fake-fast",
                "size": "64x64",
            },
        ).json()

        def completed() -> int:
            return int(
                client.get(f"/v1/images/batches/{batch['id']}").json()["request_counts"][
                    "completed"
                ]
            )

        wait_for(lambda: completed() >= 10, 60, "batch under way")
        stack.kill_consumers()
        wait_for(
            lambda: client.get(f"/v1/images/batches/{batch['id']}").json()["status"] == "completed",
            120,
            "batch completed",
        )
        done = client.get(f"/v1/images/batches/{batch['id']}").json()
        output = client.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()
    assert done["request_counts"] == {"total": 200, "completed": 200, "failed": 0}
    ids = [json.loads(x)["custom_id"] for x in output]
    assert len(ids) == 200
    assert len(set(ids)) == 200
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            per_item = conn.execute(
                sa.text(
                    "SELECT batch_item_id, count(*) FROM job WHERE batch_id = :b "
                    "AND status = 'succeeded' GROUP BY batch_item_id"
                ),
                {"b": batch["id"]},
            ).all()
            images = conn.execute(
                sa.text(
                    "SELECT count(*) FROM image JOIN job ON job.id = image.job_id "
                    "WHERE job.batch_id = :b"
                ),
                {"b": batch["id"]},
            ).scalar_one()
    finally:
        engine.dispose()
    assert len(per_item) == 200
    assert all(n == 1 for _, n in per_item)
    assert images == 200


def test_storage_outage_delays_a_job_which_completes_once_storage_is_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    s3 = S3Server(free_port()).start()
    stack = Stack(Path(tmp_path_factory.mktemp("s3-outage")), s3.url)
    try:
        s3.stop()
        with stack.client() as client:
            job = stack.submit("outage")
            wait_for(lambda: "storage unreachable" in stack.worker.log(), 60, "a failed upload")
            # Still running: the job waits for storage, it is not failed, and says so.
            waiting = _once_it_says_what_it_waits_on(client, job["id"])
            assert waiting["status"] == "running"
            assert str(waiting["status_detail"]).startswith("waiting for storage: ")
            # An upload the API cannot store answers 503 in OpenAI's shape.
            upload = client.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": ("in.jsonl", b"{}\n", "application/jsonl")},
            )
            assert upload.status_code == 503
            assert upload.headers["retry-after"]
            assert upload.json()["error"]["code"] == "service_unavailable"
            s3.start()
            done = stack.wait_job(job["id"], timeout=90)
        assert done["status"] == "succeeded"
        assert done["attempts"] == 1
        assert "status_detail" not in done
        image = httpx.get(done["result"]["data"][0]["url"])
        assert image.status_code == 200
        assert image.content.startswith(b"\x89PNG")
        _a_missing_bucket_is_waited_for_by_name(stack, s3.url)
    finally:
        stack.close()
        s3.stop()


def _once_it_says_what_it_waits_on(client: httpx.Client, job_id: str) -> dict[str, object]:
    """The job as soon as its ``status_detail`` is set."""
    seen: dict[str, object] = {}
    wait_for(
        lambda: bool(
            seen.update(client.get(f"/v1/images/jobs/{job_id}").json()) or seen.get("status_detail")
        ),
        30,
        "the job to say what it waits on",
    )
    return seen


def _a_missing_bucket_is_waited_for_by_name(stack: Stack, s3_url: str) -> None:
    """A bucket not made yet is set-up, not a bad job: the job waits, naming the
    bucket, and completes once it exists (it was an internal error before)."""
    import boto3

    bucket = stack.env["IMAGEGEN_S3_BUCKET"]
    s3 = boto3.resource(
        "s3",
        endpoint_url=s3_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        s3.Bucket(bucket).objects.all().delete()
        s3.Bucket(bucket).delete()
        with stack.client() as client:
            job = stack.submit("no bucket yet")
            seen = _once_it_says_what_it_waits_on(client, job["id"])
        assert seen["status"] == "running"
        assert f"the bucket '{bucket}' does not exist" in str(seen["status_detail"])
        s3.create_bucket(Bucket=bucket)
        assert stack.wait_job(job["id"], timeout=60)["status"] == "succeeded"
    finally:
        s3.meta.client.close()
