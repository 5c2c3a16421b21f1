"""Batch lines in flight are bounded per project, across its batches (issue 26:
batch lines of different projects share capacity fairly): a project running two
batches gets no more lines in flight than one running one."""

from __future__ import annotations

import time

import pytest

from shared.batches.pump import pump
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
from tests.service.conftest import Service


def _batch(service: Service, key: str, lines: int) -> str:
    with service.client(key) as client:
        resp = client.post(
            "/v1/images/batches",
            json={
                "model": "procedural",
                "size": "64x64",
                "prompts": [f"fair {i}" for i in range(lines)],
            },
        )
    assert resp.status_code == 200, resp.text
    batch_id: str = resp.json()["id"]
    return batch_id


def test_a_projects_batches_share_one_in_flight_bound(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "batch_max_in_flight", 4)
    many, few = service.create_key("fair-many"), service.create_key("fair-few")
    with service.paused():
        first, second = _batch(service, many, 6), _batch(service, many, 6)
        other = _batch(service, few, 6)
        with unit_of_work() as session:
            started = [pump(session, batch_id).started for batch_id in (first, second, other)]
    # The first batch takes the project's four; its sibling waits; the other
    # project has four of its own.
    assert started == [4, 0, 4]
    for batch_id, key in ((first, many), (second, many), (other, few)):
        done = _wait(service, key, batch_id)
        assert done["request_counts"] == {"total": 6, "completed": 6, "failed": 0}


def _wait(service: Service, key: str, batch_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        with service.client(key) as client:
            body: dict[str, object] = client.get(f"/v1/images/batches/{batch_id}").json()
        if body["status"] == "completed" or time.monotonic() > deadline:
            return body
        time.sleep(0.05)
