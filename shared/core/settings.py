"""Service settings, read from ``IMAGEGEN_*`` environment variables.

With nothing set the service runs on embedded defaults: SQLite and local file
storage under ``IMAGEGEN_DATA_DIR``, kombu's filesystem transport as broker,
and the built-in ``procedural`` model.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.core.private_files import private_dir, read_private_file


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_", extra="ignore")

    data_dir: Path = Path(".imagegen")
    database_url: str | None = None
    # Each process's PostgreSQL pool: connections kept open, and how many more it
    # may open under a burst. A deployment of many processes sizes these (or puts
    # PgBouncer in front) to stay under the server's max_connections: docs/capacity.md.
    database_pool_size: int = Field(default=20, ge=1)
    database_max_overflow: int = Field(default=40, ge=0)
    broker_url: str | None = None
    redis_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    # Endpoint named in presigned URLs when clients reach S3 by another address
    # than the service does (MinIO inside compose); s3_endpoint_url when unset.
    s3_public_endpoint_url: str | None = None
    models_file: Path | None = None
    dev_api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # Secret for the HMAC that signs local-storage file URLs. Generated and kept
    # under data_dir when unset, so signed URLs survive a restart.
    secret_key: str | None = None

    sync_wait_seconds: float = 300.0
    url_expiry_seconds: int = 3600
    provider_timeout_seconds: float = 180.0
    provider_max_attempts: int = 4
    # A queue provider's job (Replicate, fal, ComfyUI) still pending this long after
    # its submit is canceled there and the call fails as a timeout (then retried
    # by the provider retry policy): their own queues and cold starts take minutes.
    upstream_job_timeout_seconds: float = Field(default=1800.0, gt=0)
    provider_backoff_seconds: float = 2.0
    provider_backoff_max_seconds: float = 60.0
    # While storage is out, a job keeps its images and tries the upload again,
    # waiting up to this long between tries, for as long as the outage lasts.
    storage_backoff_max_seconds: float = 30.0
    # How many provider calls one worker process holds at once (threads pool size;
    # threads start on demand). Measured (bench/bench_capacity.py): 2,000 calls in
    # flight against a 30 s upstream cost one consumer about 96 KB of RSS each.
    worker_concurrency: int = 2048
    # How long `imagegen worker` waits, on SIGTERM, for its consumers to finish the
    # jobs they hold before killing them (their jobs then go back to the queue when
    # their leases end, an attempt spent). A deployment that must wait out its
    # longest provider call sets it above IMAGEGEN_PROVIDER_TIMEOUT_SECONDS, and
    # its grace period (Kubernetes, compose) above this plus 5 s: docs/deploy.md.
    worker_drain_seconds: float = Field(default=60.0, gt=0)
    # How many jobs of one worker process hold provider answers in memory at once,
    # from reading the answer to storing its images (shared/providers/answers.py):
    # when thousands of calls return together, peak memory is bounded by this.
    worker_answer_slots: int = Field(default=16, ge=1, le=4096)
    # Attempts a job gets (each claim by a worker is one; a worker that dies or loses
    # its lease mid-job costs one). Past it the job ends failed with
    # max_attempts_exceeded: a job that cannot finish is never retried forever, and
    # each retry may pay a provider.
    job_max_attempts: int = Field(default=5, ge=1, le=1000)
    # While the database is unreachable, a worker holding a finished result keeps
    # trying to record it for this long before the job is left to its lease.
    record_retry_seconds: float = 300.0
    # Local models: the device a GPU worker runs them on (`imagegen worker --device
    # cuda:1` sets it), overriding a model's own `device: auto`; never download
    # from the Hugging Face Hub (a Hub id must be in the local cache).
    device: str | None = None
    hf_offline: bool = False
    # Local models' memory budget on a device (issue 30): pipelines past it are
    # unloaded least recently used. A fraction of the device's memory
    # (`imagegen worker --gpu-memory-fraction`), or bytes (wins where set; the
    # budget on a CPU, where there is no device total to take a fraction of).
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    gpu_memory_bytes: int | None = Field(default=None, ge=1)
    # A GPU consumer's messages held at once: the jobs it chooses each call's
    # companions and the next turn from (worker/gpu/). Each waits on a thread (a
    # few pages of stack); 256 holds the in-flight lines of 32 projects' batches
    # (8 chunks each) and still leaves room for interactive requests.
    gpu_worker_slots: int = Field(default=256, ge=1, le=1024)
    # Least time between two progress writes of a denoising job (the job's
    # `progress` and its SSE `job.progress` events); a cancel is noticed at each.
    progress_interval_seconds: float = 0.5
    # Edits and variations: the most bytes one input image (or mask) may have, and
    # the most images one edit takes (OpenAI's limits for its GPT image models).
    edit_max_image_bytes: int = 50 * 1024 * 1024
    edit_max_images: int = 16
    # Pixels: the most one input image (or mask) may have, read from its header
    # before it is decoded (a 657 KB PNG can declare 169 Mpx: 676 MiB decoded), and
    # the most all of one request's inputs may have together.
    edit_max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    edit_max_total_pixels: int = Field(default=4 * 4096 * 4096, ge=1)
    # The most bytes a request body may have where no route says otherwise (JSON):
    # refused with 413 as the bytes arrive, never buffered past it.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # A request's headers must arrive within this of its first byte, and each piece
    # of its body within this of the last: a slower client is cut off.
    client_timeout_seconds: float = Field(default=30.0, gt=0)
    # Where this host's imagegen processes write their metrics (prometheus-client's
    # multiprocess files), summed by /metrics; data_dir/metrics when unset.
    metrics_dir: Path | None = None
    # A running job whose worker stops renewing its lease for this long is re-queued.
    job_lease_seconds: float = 60.0
    # A queued job whose broker message was published this long ago but never
    # picked up is published again (the message was lost, e.g. a broker restart
    # without persistence). Duplicates are harmless: the claim is guarded.
    redeliver_after_seconds: float = 300.0
    sweep_interval_seconds: float = 5.0
    # The purge (issue 29, shared/retention/): how often one pass runs (one worker's
    # sweeper publishes it; a Redis lock keeps it to one at a time with Redis), how
    # old an unowned object must be before the orphan sweep deletes it, and how many
    # objects one pass examines (it resumes from there next time).
    purge_interval_seconds: float = Field(default=300.0, gt=0)
    # The share of its time a pass works: it rests between chunks for the rest, so
    # the API sharing the hosts and the database is not slowed (1.0: flat out).
    purge_duty_cycle: float = Field(default=0.5, gt=0, le=1)
    orphan_min_age_seconds: float = Field(default=86400.0, ge=0)
    orphan_scan_limit: int = Field(default=10000, ge=1)
    broker_polling_interval: float = 0.05
    log_level: str = "INFO"
    # "text" (readable, the default) or "json" (one object a line, for a pipeline).
    log_format: Literal["text", "json"] = "text"
    # Default limits (a project's own setting wins; 0 means unlimited). Enforced
    # only with IMAGEGEN_REDIS_URL set.
    key_requests_per_minute: int = 600
    # Length of the rate-limit window the per-key limit counts in (a minute;
    # shorter only to test recovery).
    rate_limit_window_seconds: int = 60
    project_images_per_day: int = 10000
    project_jobs_in_flight: int = 1000
    # Webhooks: the Standard Webhooks retry schedule (seconds before each attempt;
    # the first is immediate), the timeout of one attempt, and whether targets may
    # resolve to loopback, private, link-local or metadata addresses (development).
    webhook_retry_schedule: list[float] = [0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
    webhook_timeout_seconds: float = 15.0
    webhook_allow_private_targets: bool = False
    # Batches: their jobs' queue, how many lines of one project's batches are queued
    # or running at once (the rest wait in SQL; one bound per project, so projects
    # share fairly however many batches each runs), and how long URLs in output
    # files live (7 days, the most an S3 SigV4 presigned URL may).
    batch_queue: str = "batch"
    batch_max_in_flight: int = 128
    # Lines of a batch run per worker task (their provider calls side by side).
    batch_chunk_size: int = 16
    # A worker consuming only the batch queue lowers its own CPU priority by this
    # much (os.nice; 0 keeps it): where batch and sync work share cores, the
    # kernel then serves sync requests first and batches take what is left.
    batch_worker_nice: int = Field(default=10, ge=0, le=19)
    # A worker given the batch queue and others serves the batch queue from a
    # child process (at that lower priority); false keeps one process.
    worker_split_batch: bool = True
    batch_url_expiry_seconds: int = 604800
    # Manages projects and keys over HTTP (/v1/admin/...); no admin API when unset.
    admin_api_key: str | None = None
    # Base URL put in local-storage file links; the request's own when unset.
    public_url: str | None = None

    def public_base_url(self) -> str:
        """Base of links made outside a request (webhook payloads in the worker)."""
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return _with_our_driver(self.database_url)
        return f"sqlite:///{(self.data_dir / 'imagegen.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def files_dir(self) -> Path:
        return (self.data_dir / "files").resolve()

    def resolved_secret_key(self) -> str:
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret_key"
        private_dir(self.data_dir)
        return read_private_file(path, lambda: secrets.token_urlsafe(48))


@lru_cache
def get_settings() -> Settings:
    return Settings()


def _with_our_driver(url: str) -> str:
    """``postgresql://`` and ``postgres://`` (what hosts and compose files hand out)
    name no driver, and SQLAlchemy would then look for psycopg2: use psycopg 3."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url
