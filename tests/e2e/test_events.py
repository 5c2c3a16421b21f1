"""Server-sent events of a job, and queue position."""

from __future__ import annotations

import json
from typing import Any

from tests.support.processes import wait_for
from tests.support.stack import Stack

ORDER = ["queued", "running", "succeeded"]


def read_events(
    stack: Stack, job_id: str, key: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    with (
        stack.client(key) as client,
        client.stream("GET", f"/v1/images/jobs/{job_id}/events", timeout=60) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in resp.iter_lines():  # ends when the server closes the stream
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                assert name is not None
                events.append((name, json.loads(line[len("data: ") :])))
    return events


def test_stream_shows_queued_running_succeeded_in_order_then_closes(stack: Stack) -> None:
    job = stack.submit("sse [slow=1.5]", model="fake-fast")
    events = read_events(stack, job["id"])
    statuses = [data["status"] for _, data in events]
    assert [name for name, _ in events] == [f"job.{s}" for s in statuses]
    assert statuses[-2:] == ["running", "succeeded"]
    assert statuses == sorted(statuses, key=ORDER.index)  # in order, no repeats
    assert len(set(statuses)) == len(statuses)
    assert events[-1][1]["result"]["data"][0]["url"]


def test_late_subscriber_starts_from_the_current_state(stack: Stack) -> None:
    job = stack.submit("late sse [slow=1.5]", model="fake-fast")
    with stack.client() as client:
        wait_for(
            lambda: client.get(f"/v1/images/jobs/{job['id']}").json()["status"] == "running",
            15,
            "running",
        )
    events = read_events(stack, job["id"])
    assert [data["status"] for _, data in events] == ["running", "succeeded"]


def test_finished_job_streams_one_event(stack: Stack) -> None:
    job = stack.submit("done before", model="procedural")
    stack.wait_job(job["id"])
    events = read_events(stack, job["id"])
    assert [name for name, _ in events] == ["job.succeeded"]


def test_other_projects_job_stream_is_404(stack: Stack) -> None:
    job = stack.submit("private stream", model="procedural")
    with stack.client(stack.key_b) as client:
        resp = client.get(f"/v1/images/jobs/{job['id']}/events")
    assert resp.status_code == 404


def test_queue_position_counts_jobs_ahead_in_the_same_queue(stack: Stack) -> None:
    jobs = [stack.submit(f"parked position {i}", model="parked") for i in range(3)]
    positions = [j["queue_position"] for j in jobs]
    assert positions[0] >= 1
    assert positions == [positions[0], positions[0] + 1, positions[0] + 2]
    with stack.client() as client:
        client.post(f"/v1/images/jobs/{jobs[0]['id']}/cancel")
        second = client.get(f"/v1/images/jobs/{jobs[1]['id']}").json()
        assert second["queue_position"] == positions[1] - 1
        listed = client.get("/v1/images/jobs", params={"status": "queued"}).json()["data"]
        assert {j["id"]: j["queue_position"] for j in listed}[jobs[2]["id"]] == positions[2] - 1
        for job in jobs[1:]:
            client.post(f"/v1/images/jobs/{job['id']}/cancel")
        done = client.get(f"/v1/images/jobs/{jobs[1]['id']}").json()
    assert "queue_position" not in done  # only while queued
