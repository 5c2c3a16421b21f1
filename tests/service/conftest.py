"""The service tier: the whole API in this process (FastAPI's TestClient), on the
embedded defaults (SQLite, local file storage, the file broker, no Redis), with
jobs run in-process by a small runner thread that claims what SQL says is queued
and calls the worker's own ``run_job``/batch steps. No server, no subprocess:
seconds for the behaviour of routes, services and the worker's steps together.
What needs real processes (Celery, Redis, PostgreSQL, S3, crashes) is in e2e."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import col, select

from api.app import create_app
from shared import registry
from shared.batches.models import PUMPED, Batch, BatchStatus
from shared.core import context, settings
from shared.core.db import unit_of_work
from shared.core.migrate import upgrade
from shared.jobs.models import Job, JobStatus
from shared.projects.service import create_key
from tests.support.stack import models_yaml
from worker.batches import pump_batch, validate
from worker.runner import run_job

BASE_URL = "http://service.test"
# Read from the environment: the service's own settings and registry, made anew.
CACHED = [settings.get_settings, registry.get_registry]


TINY_LOCAL = "tiny-local"


def tiny_local_entry(home: Path) -> dict[str, Any]:
    """A local model on the CPU whose pipeline a test builds when it needs it
    (tests/service/test_gpu_room.py), at ``home/tiny-local/model``."""
    return {
        "name": TINY_LOCAL,
        "provider": "diffusers",
        "model_path": str(home / TINY_LOCAL / "model"),
        "device": "cpu",
        "steps": 4,
        "quality_steps": {"low": 4, "high": 400},
        "max_batch_images": 4,
        "batch_wait_ms": 20,
        "preload": False,
        "capabilities": {"sizes": ["64x64", "32x32"], "max_n": 4},
    }


class InProcessRunner:
    """Runs queued jobs and open batches of the in-process service, as a worker would."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="service-runner", daemon=True)

    def start(self) -> InProcessRunner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def run_once(self) -> int:
        with unit_of_work() as session:
            jobs = list(
                session.exec(select(col(Job.id)).where(col(Job.status) == JobStatus.queued))
            )
            batches = list(
                session.exec(
                    select(Batch.id, Batch.status).where(
                        col(Batch.status).in_([*PUMPED, BatchStatus.validating])
                    )
                )
            )
        for job_id in jobs:
            run_job(job_id)
        for batch_id, status in batches:
            if status == BatchStatus.validating:
                validate(batch_id)
            else:
                pump_batch(batch_id)
        return len(jobs)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.run_once()


class Service:
    def __init__(self, app: FastAPI, runner: InProcessRunner) -> None:
        self.app = app
        self.runner = runner
        self.key_a = self.create_key("service-a")

    def create_key(self, project: str, user: str = "") -> str:
        with unit_of_work() as session:
            _, plaintext = create_key(session, project, user=user)
        return plaintext

    def client(self, key: str | None = None) -> TestClient:
        """The app, as ``key`` (the default project's key unless given)."""
        return TestClient(
            self.app, base_url=BASE_URL, headers={"Authorization": f"Bearer {key or self.key_a}"}
        )

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing runs while inside: what is submitted stays queued."""
        self.runner.stop()
        try:
            yield
        finally:
            self.runner = InProcessRunner().start()

    def wait_for(
        self, path: str, done: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        """GET ``path`` until ``done(body)`` holds (the runner works in the background)."""
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = self.client().get(path).json()
            if done(body) or time.monotonic() > deadline:
                return body
            time.sleep(0.02)

    def anonymous(self) -> TestClient:
        return TestClient(self.app, base_url=BASE_URL)


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home: Path = tmp_path_factory.mktemp("service")
    models_file = home / "models.yaml"
    models = models_yaml("http://127.0.0.1:9/v1")
    models["models"].append(tiny_local_entry(home))
    models_file.write_text(yaml.safe_dump(models))
    patch = pytest.MonkeyPatch()
    for name in (
        "IMAGEGEN_DATABASE_URL",
        "IMAGEGEN_BROKER_URL",
        "IMAGEGEN_REDIS_URL",
        "IMAGEGEN_S3_BUCKET",
        "IMAGEGEN_MODELS_FILE",
        "IMAGEGEN_PUBLIC_URL",
    ):
        patch.delenv(name, raising=False)
    env: dict[str, Any] = {
        "IMAGEGEN_DATA_DIR": str(home),
        "IMAGEGEN_SYNC_WAIT_SECONDS": "20",
        "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
        "IMAGEGEN_ADMIN_API_KEY": "admin-service-key",
        # The e2e registry: the procedural model first, then OpenAI-shaped models whose
        # upstream is never called here (their capabilities drive validation).
        "IMAGEGEN_MODELS_FILE": str(models_file),
    }
    for name, value in env.items():
        patch.setenv(name, value)
    for cached in CACHED:
        cached.cache_clear()
    context.start()  # this package's own engine, storage and clients
    upgrade()
    runner = InProcessRunner().start()
    app = create_app()
    with TestClient(app, base_url=BASE_URL):  # runs the app's lifespan
        service = Service(app, runner)
        yield service
    service.runner.stop()
    context.stop()
    patch.undo()
    for cached in CACHED:
        cached.cache_clear()
