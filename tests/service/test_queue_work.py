"""``imagegen_queue_work{queue}`` in /metrics: the figure deploy/'s KEDA scalers
scale each kind of worker on (docs/deploy.md)."""

from __future__ import annotations

import re
import time

from api.routes.metrics import queue_work
from tests.service.conftest import Service

ADMIN = {"Authorization": "Bearer admin-service-key"}
SERIES = re.compile(r'^imagegen_queue_work\{queue="([^"]+)"\} (\S+)$', re.MULTILINE)


def _work(service: Service) -> dict[str, float]:
    text = service.anonymous().get("/metrics", headers=ADMIN).text
    return {queue: float(value) for queue, value in SERIES.findall(text)}


def test_queue_work_counts_waiting_jobs_and_due_deliveries_per_queue(service: Service) -> None:
    client = service.client(service.create_key("queue-work"))
    # The gauge counts every project: wait until jobs other tests left are done (each
    # may still add a due delivery when it finishes), so what changes below is ours.
    deadline = time.monotonic() + 15
    while (before := _work(service)).get("default", 0) > 0:
        assert time.monotonic() < deadline, f"other tests' jobs still running: {before}"
        time.sleep(0.05)
    # Every queue a worker may serve is said, an idle one as 0: a scaler's query
    # always finds its series.
    assert {"default", "webhooks", "batch", "parked"} <= set(before)
    done = client.post(
        "/v1/images/generations",
        json={
            "prompt": "hooked",
            "size": "64x64",
            "webhook_url": "http://127.0.0.1:9/hook",
            "webhook_events": ["job.succeeded"],
        },
    )
    assert done.status_code == 200
    with service.paused():
        for _ in range(2):
            waiting = client.post(
                "/v1/images/generations",
                headers={"Prefer": "respond-async"},
                json={"model": "parked", "prompt": "waiting", "size": "64x64"},
            )
            assert waiting.status_code == 202
        after = _work(service)
    assert after["parked"] - before["parked"] == 2
    # The finished job's delivery is due (no webhook worker runs here).
    assert after["webhooks"] - before["webhooks"] == 1
    assert after["default"] == before["default"]  # the finished job is no work


def test_running_jobs_are_work_as_much_as_waiting_ones(service: Service) -> None:
    """A count of the waiting alone falls to 0 while busy workers keep up: scaled on
    it, the workers doing the work would be taken away."""
    gauge = queue_work(
        [
            ("queued", "procedural", "default", 2),
            ("running", "procedural", "default", 3),
            ("running", "sd15", "gpu", 1),
        ],
        deliveries=4,
    )
    work = {sample.labels["queue"]: sample.value for sample in gauge.samples}
    assert work["default"] == 5
    assert work["gpu"] == 1
    assert work["webhooks"] == 4
    assert work["batch"] == 0
