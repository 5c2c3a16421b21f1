"""The metrics themselves (imported only after ``metrics.enable``)."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.registry import REGISTRY, Collector

from shared.core.metrics import MULTIPROC_ENV

if os.environ.get(MULTIPROC_ENV):  # before the first metric writes its file there
    Path(os.environ[MULTIPROC_ENV]).mkdir(parents=True, exist_ok=True)

# Image work spans milliseconds (a rejected request) to minutes (a slow provider).
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

HTTP_SECONDS = Histogram(
    "imagegen_http_request_duration_seconds",
    "API requests by route template, method and status.",
    ["route", "method", "status"],
    buckets=SECONDS,
)
PROVIDER_SECONDS = Histogram(
    "imagegen_provider_call_duration_seconds",
    "Provider calls (one upstream call or one pipeline call) by model.",
    ["model"],
    buckets=SECONDS,
)
GPU_CALL_IMAGES = Histogram(
    "imagegen_gpu_call_images",
    "Images each pipeline call of a local model made, from as many jobs as shared it "
    "(the count is the calls; the sum over the count, images per call).",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
GPU_CALL_SECONDS = Histogram(
    "imagegen_gpu_call_duration_seconds",
    "Pipeline calls of a local model, each for one or more jobs.",
    ["model"],
    buckets=SECONDS,
)
PROVIDER_ERRORS = Counter(
    "imagegen_provider_errors_total", "Failed provider calls by model and code.", ["model", "code"]
)
DEPLOYMENT_CALLS = Counter(
    "imagegen_deployment_calls_total",
    "Calls to each deployment of a model, by outcome (ok, or the error's code).",
    ["model", "deployment", "outcome"],
)
DEPLOYMENT_SECONDS = Histogram(
    "imagegen_deployment_call_duration_seconds",
    "Calls to each deployment of a model that answered with images.",
    ["model", "deployment"],
    buckets=SECONDS,
)
DEPLOYMENT_COOLDOWNS = Counter(
    "imagegen_deployment_cooldowns_total",
    "Times a deployment was put in cooldown after a failure.",
    ["model", "deployment"],
)
CAPACITY_WAITS = Counter(
    "imagegen_capacity_waits_total",
    "Calls that found every deployment of a model at its limit, by how they waited "
    "(in_place: a short wait in the worker; queue: the job queued again).",
    ["model", "how"],
)
COST_USD = Counter(
    "imagegen_cost_usd_total",
    "What the jobs that succeeded cost, in USD, by the model asked for (priced models).",
    ["model"],
)
JOBS_FINISHED = Counter(
    "imagegen_jobs_finished_total", "Jobs that ended, by status and model.", ["status", "model"]
)
STORAGE_WRITES = Counter(
    "imagegen_storage_writes_total", "Image uploads by outcome (ok, unavailable).", ["outcome"]
)
WEBHOOK_DELIVERIES = Counter(
    "imagegen_webhook_attempts_total",
    "Webhook delivery attempts by outcome (delivered, retry, failed, disabled, ...).",
    ["outcome"],
)


def scrape(extra: Collector | None = None) -> bytes:
    """The exposition text: every process's metrics (multiprocess mode) or this
    process's, then ``extra``'s (the SQL gauges; families are distinct, so the two
    texts simply follow each other)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
    else:
        text = generate_latest(REGISTRY)
    if extra is not None:
        own = CollectorRegistry()
        own.register(extra)
        text += generate_latest(own)
    return text


def serve(port: int) -> None:
    """Serve every process's metrics of this host on ``port`` (a daemon thread)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, registry=registry)
