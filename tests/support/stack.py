"""A whole deployment for one test module: Redis, PostgreSQL, S3 (moto), the API
and a worker as separate processes, and a fake upstream provider."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.fake_upstream import EXPECTED_KEY, FakeUpstream
from tests.support.processes import (
    PG_ADMIN_URL,
    RedisServer,
    ServiceProcess,
    create_database,
    drop_database,
    free_port,
    imagegen_workers,
    wait_for,
    wait_http,
)

FINISHED = ("succeeded", "failed", "canceled")


def models_yaml(upstream_url: str) -> dict[str, Any]:
    upstream = {"provider": "openai", "base_url": upstream_url, "api_key_env": "FAKE_UPSTREAM_KEY"}
    return {
        "models": [
            {
                "name": "procedural",
                "provider": "procedural",
                "capabilities": {
                    "sizes": ["1024x1024", "64x64", "256x256", "512x512"],
                    "max_n": 10,
                    "qualities": ["standard", "hd"],
                    "styles": ["vivid", "natural"],
                    "output_compression": True,
                    "max_prompt_chars": 32000,
                    "edits": True,
                    "variations": True,
                },
            },
            {
                "name": "dall-e-2",
                "upstream_model": "dall-e-2",
                "upstream_response_format": "url",
                **upstream,
                "capabilities": {
                    "sizes": ["1024x1024", "256x256", "512x512"],
                    "max_n": 10,
                    "max_prompt_chars": 1000,
                    "edits": True,
                    "variations": True,
                },
            },
            {
                "name": "dall-e-3",
                "upstream_model": "dall-e-3",
                **upstream,
                "capabilities": {
                    "sizes": ["1024x1024", "1792x1024", "1024x1792"],
                    "max_n": 1,
                    "upstream_max_n": 1,
                    "qualities": ["standard", "hd"],
                    "default_quality": "standard",
                    "styles": ["vivid", "natural"],
                    "default_style": "vivid",
                    "max_prompt_chars": 4000,
                },
            },
            {
                "name": "gpt-image-1",
                "upstream_model": "gpt-image-1",
                "upstream_response_format": None,
                "upstream_streams": True,
                **upstream,
                "capabilities": {
                    "sizes": ["auto", "1024x1024", "1536x1024", "1024x1536", "64x64"],
                    "default_size": "auto",
                    "max_n": 10,
                    "qualities": ["auto", "low", "medium", "high"],
                    "default_quality": "auto",
                    "backgrounds": ["auto", "transparent", "opaque"],
                    "moderations": ["auto", "low"],
                    "output_compression": True,
                    "max_prompt_chars": 32000,
                    "edits": True,
                },
            },
            # An upstream that makes one image per call: the worker must fan out.
            {
                "name": "fake-n1",
                "upstream_model": "fake-n1-upstream",
                **upstream,
                "capabilities": {"sizes": ["64x64"], "max_n": 4, "upstream_max_n": 1},
            },
            # A fast-upstream model on the default queue used by fault tests.
            {
                "name": "fake-fast",
                "upstream_model": "fake-fast",
                **upstream,
                "capabilities": {"sizes": ["64x64", "256x256", "1024x1024"], "max_n": 4},
            },
            # A price per image (budgets: tests/e2e/test_keys_and_limits.py).
            {
                "name": "priced",
                "upstream_model": "fake-fast",
                **upstream,
                "price": {"per_image": 0.01},
                "capabilities": {"sizes": ["64x64"], "max_n": 4},
            },
            # A queue no worker consumes: its jobs stay queued (cancel tests).
            {
                "name": "parked",
                "provider": "procedural",
                "queue": "parked",
                "capabilities": {"sizes": ["64x64"], "max_n": 2},
            },
        ]
    }


class Stack:
    def __init__(
        self,
        workdir: Path,
        s3_endpoint: str,
        *,
        worker_env: dict[str, str] | None = None,
        api_env: dict[str, str] | None = None,
        pg_admin_url: str = PG_ADMIN_URL,
        extra_models: list[dict[str, Any]] | None = None,
        broker_url: str | None = None,
    ) -> None:
        """``broker_url``: the broker (a RabbitMQ node's, tests/support/rabbitmq.py);
        the stack's own Redis when None. Redis serves the rest either way (limits,
        events, replies)."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.upstream = FakeUpstream().start()
        self.redis = RedisServer(workdir).start()
        self.pg_admin_url = pg_admin_url
        self.database_url = create_database(pg_admin_url)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        models_file = workdir / "models.yaml"
        models = models_yaml(self.upstream.base_url)
        models["models"] += extra_models or []
        models_file.write_text(yaml.safe_dump(models))
        self.env = {
            **os.environ,
            "IMAGEGEN_DATA_DIR": str(workdir / "data"),
            "IMAGEGEN_DATABASE_URL": self.database_url,
            "IMAGEGEN_BROKER_URL": broker_url or self.redis.url,
            "IMAGEGEN_REDIS_URL": self.redis.url,
            "IMAGEGEN_S3_ENDPOINT_URL": s3_endpoint,
            "IMAGEGEN_S3_BUCKET": f"imagegen-{self.port}",
            "IMAGEGEN_MODELS_FILE": str(models_file),
            "IMAGEGEN_PORT": str(self.port),
            "IMAGEGEN_SECRET_KEY": "test-secret",
            "IMAGEGEN_PROVIDER_TIMEOUT_SECONDS": "3",
            "IMAGEGEN_PROVIDER_MAX_ATTEMPTS": "3",
            "IMAGEGEN_PROVIDER_BACKOFF_SECONDS": "0.2",
            "IMAGEGEN_JOB_LEASE_SECONDS": "3",
            "IMAGEGEN_SWEEP_INTERVAL_SECONDS": "0.5",
            "IMAGEGEN_REDELIVER_AFTER_SECONDS": "4",
            "IMAGEGEN_SYNC_WAIT_SECONDS": "60",
            "IMAGEGEN_WORKER_CONCURRENCY": "64",
            "IMAGEGEN_RATE_LIMIT_WINDOW_SECONDS": "4",
            "IMAGEGEN_CLIENT_TIMEOUT_SECONDS": "3",
            "IMAGEGEN_ADMIN_API_KEY": "sk-admin-test",
            # Receivers in tests listen on loopback; the refusal is tested on its own.
            "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
            "IMAGEGEN_WEBHOOK_RETRY_SCHEDULE": "[0, 1, 1, 1, 1]",
            "IMAGEGEN_WEBHOOK_TIMEOUT_SECONDS": "3",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "FAKE_UPSTREAM_KEY": EXPECTED_KEY,
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("OPENAI_API_KEY", None)
        self._cli("migrate")
        self._make_bucket()
        self.key_a = self.create_key("alpha")
        self.key_b = self.create_key("beta")
        self.api = ServiceProcess(
            ["api"], {**self.env, **(api_env or {})}, workdir / "api.log"
        ).start()
        self.worker = self.new_worker(worker_env)
        wait_http(f"{self.base_url}/healthz")

    def _cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def _make_bucket(self) -> None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.env["IMAGEGEN_S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        try:
            s3.create_bucket(Bucket=self.env["IMAGEGEN_S3_BUCKET"])
        finally:
            s3.close()  # its keep-alive connection would outlive the test

    def create_key(self, project: str, user: str = "") -> str:
        """A new key of ``project`` (made if new), written straight to the stack's
        database with the service's own code: ``imagegen keys create`` costs a
        Python start (about 1.7 s) per key, and the CLI is tested on its own
        (tests/e2e/test_embedded.py, test_keys_and_limits.py)."""
        import sqlalchemy as sa
        from sqlmodel import Session

        from shared.projects.service import create_key

        engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
        try:
            with Session(engine) as session, session.begin():
                _key, plaintext = create_key(session, project, user=user)
        finally:
            engine.dispose()
        return plaintext

    def cli(self, *args: str) -> str:
        return self._cli(*args)

    def new_worker(self, extra_env: dict[str, str] | None = None) -> ServiceProcess:
        worker = ServiceProcess(
            ["worker", "--queues", "default,webhooks,batch"],
            {**self.env, **(extra_env or {})},
            self.workdir / "worker.log",
        ).start()
        self.worker = worker
        return worker

    def consumers(self) -> list[int]:
        """The consumer processes under this stack's ``imagegen worker``."""
        assert self.worker is not None
        assert self.worker.proc is not None
        return imagegen_workers(parent=self.worker.proc.pid)

    def kill_consumers(self) -> None:
        """SIGKILL every consumer (a crash: no acks, no cleanup) and wait until the
        supervising ``imagegen worker`` has started new ones."""
        before = self.consumers()
        assert before, "no consumer running"
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: len(set(self.consumers()) - set(before)) == len(before),
            60,
            "the supervisor to start new consumers",
        )

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            timeout=90,
            headers={"Authorization": f"Bearer {key or self.key_a}"},
        )

    def submit(
        self, prompt: str, model: str = "procedural", key: str | None = None, **body: Any
    ) -> dict[str, Any]:
        """An async generation (``Prefer: respond-async``, 64x64 unless ``body`` says
        otherwise): the job it accepted."""
        with self.client(key) as client:
            resp = client.post(
                "/v1/images/generations",
                headers={"Prefer": "respond-async"},
                json={"model": model, "prompt": prompt, "size": "64x64", **body},
            )
        assert resp.status_code == 202, resp.text
        job: dict[str, Any] = resp.json()
        return job

    def wait_job(self, job_id: str, key: str | None = None, timeout: float = 60) -> dict[str, Any]:
        with self.client(key) as client:
            job: dict[str, Any] = {}

            def done() -> bool:
                nonlocal job
                job = client.get(f"/v1/images/jobs/{job_id}").json()
                return job.get("status") in FINISHED

            wait_for(done, timeout, f"job {job_id}", interval=0.2)
            return job

    def close(self) -> None:
        self.api.stop()
        if self.worker is not None:
            self.worker.stop()
        self.redis.stop()
        self.upstream.stop()
        time.sleep(0.2)
        drop_database(self.database_url, self.pg_admin_url)
