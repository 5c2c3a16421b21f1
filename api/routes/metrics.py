"""``GET /metrics``: Prometheus' text format (shared/core/metrics.py says what is in
it and where each figure comes from). With ``IMAGEGEN_ADMIN_API_KEY`` set it needs
that key (a scrape config's ``authorization``); without one it is open, as the
rest of a development setup is."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from api.deps import require_admin
from shared.batches.service import open_batch_lines
from shared.core.broker import WEBHOOK_QUEUE
from shared.core.db import unit_of_work
from shared.core.instruments import scrape
from shared.core.settings import get_settings
from shared.jobs.service import active_jobs
from shared.projects.service import list_projects
from shared.registry import get_registry
from shared.usage import storage_bytes_by_project
from shared.webhooks.service import deliveries_due

router = APIRouter()


class WorkGauges(Collector):
    """Jobs queued and running by model, queue depth, each queue's work, open
    batches' lines: from SQL, at scrape time."""

    def collect(self) -> Iterator[Metric]:
        with unit_of_work() as session:
            jobs = active_jobs(session)
            lines = open_batch_lines(session)
            due = deliveries_due(session)
        by_model = GaugeMetricFamily(
            "imagegen_jobs",
            "Jobs queued or running, by status and model.",
            labels=["status", "model"],
        )
        depth = GaugeMetricFamily(
            "imagegen_queue_depth", "Jobs waiting on each queue.", labels=["queue"]
        )
        queued: dict[str, int] = {}
        per_model: dict[tuple[str, str], int] = {}
        for status, model, queue, count in jobs:
            per_model[(status, model)] = per_model.get((status, model), 0) + count
            if status == "queued":
                queued[queue] = queued.get(queue, 0) + count
        for (status, model), count in sorted(per_model.items()):
            by_model.add_metric([status, model], count)
        for queue, count in sorted(queued.items()):
            depth.add_metric([queue], count)
        batches = GaugeMetricFamily(
            "imagegen_batch_lines",
            "Lines of the batches still running, by line status.",
            labels=["status"],
        )
        for status, count in lines:
            batches.add_metric([status], count)
        yield from (by_model, depth, queue_work(jobs, due), batches, STORAGE.gauge())


class StorageGauge:
    """``imagegen_project_storage_bytes``: each project's stored bytes, summed (three
    grouped sums over every project's rows) at most once every ``ttl`` seconds per
    process, whatever the scrape interval and however many scrapers: a scrape
    between sums says the last figures."""

    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._figures: list[tuple[str, str, int]] = []
        self._until = 0.0

    def figures(self) -> list[tuple[str, str, int]]:
        with self._lock:
            if time.monotonic() >= self._until:
                with unit_of_work() as session:
                    stored = storage_bytes_by_project(session)
                    projects = list_projects(session)
                self._figures = [(p.name, p.id, stored.get(p.id, 0)) for p in projects]
                self._until = time.monotonic() + self.ttl
            return self._figures

    def forget(self) -> None:
        """The next scrape sums again."""
        with self._lock:
            self._until = 0.0

    def gauge(self) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(
            "imagegen_project_storage_bytes",
            "Bytes each project keeps stored: images, edit inputs and files "
            "(as GET /v1/usage's storage_bytes; summed at most every 30 s).",
            labels=["project", "project_id"],
        )
        for name, project_id, stored in self.figures():
            gauge.add_metric([name, project_id], stored)
        return gauge


STORAGE = StorageGauge()


def queue_work(jobs: list[tuple[str, str, str, int]], deliveries: int) -> GaugeMetricFamily:
    """What each queue's workers hold or must take: its jobs queued or running, and on
    the webhooks queue the deliveries due or being attempted. The figure KEDA scales
    each kind of worker on (deploy/keda/): in flight as well as waiting, since a
    count of the waiting alone falls to 0 while busy workers keep up, and scaling
    on it would take away the workers doing the work. From SQL, not the broker:
    a consumer reserves as many messages as it has threads (2,048 by default), so
    a broker's queue stays empty until every worker is full, and it holds no
    running work at all. Every known queue is said, 0 when idle, so a scaler's
    query always finds its series."""
    settings = get_settings()
    known = {"default", WEBHOOK_QUEUE, settings.batch_queue}
    known |= {spec.queue for spec in get_registry().models}
    work = dict.fromkeys(known, 0)
    for _status, _model, queue, count in jobs:
        work[queue] = work.get(queue, 0) + count
    work[WEBHOOK_QUEUE] += deliveries
    gauge = GaugeMetricFamily(
        "imagegen_queue_work",
        "Work on each queue: jobs queued or running; on the webhooks queue, deliveries "
        "due or being attempted.",
        labels=["queue"],
    )
    for queue, count in sorted(work.items()):
        gauge.add_metric([queue], count)
    return gauge


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    if get_settings().admin_api_key:
        require_admin(request)
    return Response(scrape(WorkGauges()), media_type=CONTENT_TYPE_LATEST)
