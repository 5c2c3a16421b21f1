"""Batches: OpenAI's Batch API through the openai package, the native JSON batch,
validation by line, cancel, and fairness to other projects."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from tests.support.processes import ServiceProcess, cmdline, imagegen_workers, wait_for
from tests.support.stack import Stack

TERMINAL = ("completed", "failed", "expired", "cancelled")


def jsonl(lines: Sequence[dict[str, Any] | str]) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/images/generations",
        "body": {"model": "procedural", "size": "64x64", **body},
    }


OPEN_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


def client_for(stack: Stack, key: str) -> openai.OpenAI:
    """A client closed when the test ends."""
    client = openai.OpenAI(api_key=key, base_url=f"{stack.base_url}/v1", max_retries=0)
    OPEN_CLIENTS.append(client)
    return client


def start_batch(client: openai.OpenAI, name: str, lines: list[dict[str, Any]]) -> Any:
    file = client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(
        input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h"
    )


def completed(client: openai.OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return counts.completed if counts is not None else 0


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 90) -> Any:
    batch = None

    def done() -> bool:
        nonlocal batch
        batch = client.batches.retrieve(batch_id)
        return batch.status in TERMINAL

    wait_for(done, timeout, f"batch {batch_id}", interval=0.3)
    return batch


def test_openai_package_batch_with_good_and_failing_lines(stack: Stack) -> None:
    key = stack.create_key("batch-openai")
    client = client_for(stack, key)
    content = jsonl(
        [
            line("fox", prompt="a fox"),
            line("owl-b64", prompt="an owl", response_format="b64_json", n=2),
            line("bad-size", prompt="a cat", size="13x13"),
            line("no-model", prompt="a dog", model="no-such-model"),
            line("policy", prompt="[content-policy] x", model="fake-fast"),
        ]
    )
    file = client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")
    assert file.purpose == "batch"
    assert file.bytes == len(content)
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/images/generations",
        completion_window="24h",
        metadata={"run": "test"},
    )
    assert batch.status in ("validating", "in_progress")
    done = wait_batch(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (
        done.request_counts.total,
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (5, 2, 3)
    assert done.metadata == {"run": "test"}
    assert done.in_progress_at
    assert done.finalizing_at
    assert done.completed_at
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    by_id = {o["custom_id"]: o for o in output}
    assert set(by_id) == {"fox", "owl-b64"}
    assert by_id["fox"]["response"]["status_code"] == 200
    url = by_id["fox"]["response"]["body"]["data"][0]["url"]
    assert httpx.get(url).status_code == 200
    assert len(by_id["owl-b64"]["response"]["body"]["data"]) == 2
    assert by_id["owl-b64"]["response"]["body"]["data"][0]["b64_json"]
    errs = {e["custom_id"]: e for e in errors}
    assert set(errs) == {"bad-size", "no-model", "policy"}
    assert errs["bad-size"]["response"]["status_code"] == 400
    assert errs["bad-size"]["response"]["body"]["error"]["param"] == "size"
    assert errs["no-model"]["response"]["status_code"] == 404
    assert errs["policy"]["response"]["body"]["error"]["code"] == "content_policy_violation"
    listed = client.batches.list()
    assert batch.id in [b.id for b in listed.data]
    assert file.id in [f.id for f in client.files.list().data]
    assert client.files.retrieve(file.id).filename == "input.jsonl"
    assert client.files.delete(file.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)


def test_invalid_input_file_names_every_bad_line(stack: Stack) -> None:
    key = stack.create_key("batch-invalid")
    client = client_for(stack, key)
    content = jsonl(
        [
            line("ok", prompt="fine"),
            "{not json",
            {**line("ok", prompt="duplicate id")},
            {**line("wrong-url", prompt="p"), "url": "/v1/chat/completions"},
            {"custom_id": "no-body", "method": "POST", "url": "/v1/images/generations"},
            {**line("get", prompt="p"), "method": "GET"},
        ]
    )
    file = client.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    done = wait_batch(client, batch.id)
    assert done.status == "failed"
    assert done.failed_at
    assert done.errors is not None
    assert done.errors.data is not None
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "invalid_body"),
        (6, "invalid_method"),
    }
    with stack.client(key) as api:
        bad = api.post(
            "/v1/batches",
            json={
                "input_file_id": file.id,
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
            },
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "endpoint"
        bad = api.post(
            "/v1/batches",
            json={
                "input_file_id": "file-nope",
                "endpoint": "/v1/images/generations",
                "completion_window": "24h",
            },
        )
        assert bad.status_code == 404


def test_cancel_mid_batch_keeps_finished_items_and_runs_no_new_ones(stack: Stack) -> None:
    key = stack.create_key("batch-cancel")
    client = client_for(stack, key)
    lines = [line(f"slow-{i}", prompt=f"[slow=0.5] c{i}", model="fake-fast") for i in range(300)]
    batch = start_batch(client, "c.jsonl", lines)
    wait_for(lambda: completed(client, batch.id) >= 5, 60, "some finished")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = wait_batch(client, batch.id)
    assert done.status == "cancelled"
    assert done.cancelled_at
    calls_at_end = len(stack.upstream.calls_for("[slow=0.5] c"))
    time.sleep(2)
    assert len(stack.upstream.calls_for("[slow=0.5] c")) == calls_at_end  # nothing new runs
    counts = done.request_counts
    assert counts is not None
    assert counts.total == 300
    assert 5 <= counts.completed < 300
    output = client.files.content(done.output_file_id).text.splitlines()
    assert len(output) == counts.completed
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert len(output) + len(errors) == 300
    assert {e["error"]["code"] for e in errors if e["error"]} == {"batch_cancelled"}


def test_native_batch_with_prompts_and_item_pages(stack: Stack) -> None:
    key = stack.create_key("batch-native")
    with stack.client(key) as api:
        resp = api.post(
            "/v1/images/batches",
            json={
                "prompts": [f"native {i}" for i in range(7)],
                "model": "procedural",
                "size": "64x64",
                "n": 1,
            },
        )
        assert resp.status_code == 200, resp.text
        batch = resp.json()
        assert batch["request_counts"]["total"] == 7
        assert batch["input_file_id"] is None
        wait_for(
            lambda: api.get(f"/v1/images/batches/{batch['id']}").json()["status"] == "completed",
            60,
            "native batch",
        )
        page1 = api.get(f"/v1/images/batches/{batch['id']}/items", params={"limit": 4}).json()
        page2 = api.get(
            f"/v1/images/batches/{batch['id']}/items",
            params={"limit": 4, "after": page1["last_line"]},
        ).json()
        bad = api.post("/v1/images/batches", json={"prompts": ["x"], "requests": [{}]})
    items = page1["data"] + page2["data"]
    assert page1["has_more"]
    assert not page2["has_more"]
    assert [i["line"] for i in items] == list(range(1, 8))
    assert all(i["status"] == "succeeded" for i in items)
    assert httpx.get(items[0]["response"]["body"]["data"][0]["url"]).status_code == 200
    assert bad.status_code == 400


def test_batch_events_stream_progress_until_the_end(stack: Stack) -> None:
    key = stack.create_key("batch-sse")
    with stack.client(key) as api:
        batch = api.post(
            "/v1/images/batches",
            json={
                "prompts": [f"sse {i}" for i in range(20)],
                "model": "procedural",
                "size": "64x64",
            },
        ).json()
        names = []
        with api.stream("GET", f"/v1/batches/{batch['id']}/events", timeout=60) as resp:
            for text in resp.iter_lines():
                if text.startswith("event: "):
                    names.append(text[len("event: ") :])
    assert names[-1] == "batch.completed"
    assert set(names[:-1]) <= {"batch.progress"}


def test_sync_request_of_another_project_is_served_while_a_large_batch_runs(stack: Stack) -> None:
    key = stack.create_key("batch-big")
    client = client_for(stack, key)
    lines = [line(f"big-{i}", prompt=f"[slow=0.2] big {i}", model="fake-fast") for i in range(1500)]
    batch = start_batch(client, "big.jsonl", lines)
    wait_for(lambda: completed(client, batch.id) >= 1, 60, "batch running")
    other = client_for(stack, stack.key_b)
    result: dict[str, Any] = {}

    def sync() -> None:
        result["r"] = other.images.generate(model="procedural", prompt="meanwhile", size="64x64")
        result["batch_status"] = client.batches.retrieve(batch.id).status

    t = threading.Thread(target=sync)
    t.start()
    t.join(60)
    assert result["r"].data
    assert result["r"].data[0].url
    assert result["batch_status"] == "in_progress"  # served before the batch ended
    client.batches.cancel(batch.id)
    wait_batch(client, batch.id)


def test_a_batch_only_worker_yields_the_cpu_and_runs_the_lines(stack: Stack) -> None:
    """A worker consuming only the batch queue lowers its CPU priority (so sync
    work sharing its cores comes first) and still runs batches end to end."""
    batch_worker = ServiceProcess(
        ["worker", "--queues", "batch"], stack.env, stack.workdir / "batch-only.log"
    ).start()
    assert batch_worker.proc is not None
    assert stack.worker.proc is not None
    supervisor = batch_worker.proc.pid
    try:
        wait_for(lambda: len(imagegen_workers(parent=supervisor)) == 1, 30, "the consumer")
        [pid] = imagegen_workers(parent=supervisor)
        wait_for(
            lambda: os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 10,
            30,
            "the batch worker's lower priority",
        )
        # The all-queues worker's sync consumer keeps the ordinary priority.
        main = [p for p in stack.consumers() if cmdline(p)[4] != "batch"]
        assert main
        assert all(
            os.getpriority(os.PRIO_PROCESS, p) == os.getpriority(os.PRIO_PROCESS, 0) for p in main
        )
        stack.worker.stop()  # only the batch-only worker is left to run the lines
        client = client_for(stack, stack.key_a)
        batch = start_batch(
            client, "nice.jsonl", [line(f"nice-{i}", prompt=f"nice {i}") for i in range(5)]
        )
        done = wait_batch(client, batch.id)
        assert done.status == "completed"
        assert done.request_counts.completed == 5
        assert done.request_counts.failed == 0
    finally:
        batch_worker.stop()
        stack.new_worker()


def test_a_batch_past_its_completion_window_expires_keeping_finished_lines(stack: Stack) -> None:
    key = stack.create_key("batch-expire")
    client = client_for(stack, key)
    lines = [line(f"exp-{i}", prompt=f"[slow=0.5] e{i}", model="fake-fast") for i in range(300)]
    batch = start_batch(client, "e.jsonl", lines)
    wait_for(lambda: completed(client, batch.id) >= 5, 60, "some finished")
    # The 24 h window runs out now (a clock cannot be wound forward across processes).
    engine = sa.create_engine(stack.database_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE batch SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": batch.id},
        )
    engine.dispose()
    done = wait_batch(client, batch.id)
    assert done.status == "expired"
    assert done.expired_at
    counts = done.request_counts
    assert counts is not None
    assert counts.total == 300
    assert 5 <= counts.completed < 300
    assert counts.completed + counts.failed == 300
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert len(output) == counts.completed
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert sorted(x["custom_id"] for x in output + errors) == sorted(f"exp-{i}" for i in range(300))
    assert {e["error"]["code"] for e in errors if e["error"]} == {"batch_expired"}


def test_a_worker_with_all_queues_runs_batch_lines_in_a_child_that_dies_with_it(
    stack: Stack,
) -> None:
    worker = ServiceProcess(
        ["worker", "--queues", "default,webhooks,batch"], stack.env, stack.workdir / "split.log"
    ).start()
    assert worker.proc is not None
    parent = worker.proc.pid
    try:
        wait_for(
            lambda: len(imagegen_workers(parent=parent)) == 2, 30, "the two consumer processes"
        )
        by_queues = {tuple(cmdline(pid)[3:]): pid for pid in imagegen_workers(parent=parent)}
        assert set(by_queues) == {
            ("--queues", "default,webhooks"),
            ("--queues", "batch", "--no-sweeper"),
        }
        child = by_queues["--queues", "batch", "--no-sweeper"]
        wait_for(
            lambda: (
                os.getpriority(os.PRIO_PROCESS, child) == os.getpriority(os.PRIO_PROCESS, 0) + 10
            ),
            30,
            "the child's lower priority",
        )
        main = by_queues["--queues", "default,webhooks"]
        assert os.getpriority(os.PRIO_PROCESS, main) == os.getpriority(os.PRIO_PROCESS, 0)
        worker.kill()  # SIGKILL: the parent cannot stop its children itself
        wait_for(
            lambda: not {child, main} & set(imagegen_workers()), 30, "the orphaned children to exit"
        )
    finally:
        worker.stop()


def test_batch_lines_count_against_the_projects_images_a_day(stack: Stack) -> None:
    stack.cli("projects", "create", "batch-quota", "--images-per-day", "5")
    key = stack.create_key("batch-quota")
    client = client_for(stack, key)
    lines = [line(f"q-{i}", prompt=f"quota {i}", n=2 if i == 0 else 1) for i in range(6)]
    done = wait_batch(client, start_batch(client, "quota.jsonl", lines).id)
    assert done.status == "completed"
    assert done.request_counts.completed == 4
    assert done.request_counts.failed == 2
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == ["q-0", "q-1", "q-2", "q-3"]
    assert sorted(x["custom_id"] for x in errors) == ["q-4", "q-5"]
    for err in errors:
        assert err["response"]["status_code"] == 429
        assert err["response"]["body"]["error"]["code"] == "images_per_day_exceeded"
    # The quota the batch used is gone for sync requests too.
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model="procedural", prompt="one more", size="64x64")
