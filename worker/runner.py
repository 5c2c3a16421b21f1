"""Run one job: claim it, call the provider for its images, store them, finish it.

Safe to run twice for the same job: the claim is a guarded UPDATE (a finished job
is never re-run, a running one only once its lease expired), storage keys are
deterministic per job and index, and images are written in the same transaction
as the guarded transition to ``succeeded``, so a job ends with exactly ``n``.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from shared.batches.pump import item_finished, lines_succeeded, pump
from shared.core.broker import publish_deliveries
from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.db import session_scope
from shared.core.events import publish_job_changed
from shared.core.settings import get_settings
from shared.core.storage import Storage, StorageUnavailable, get_storage, image_key
from shared.imaging import UnreadableImage, encode
from shared.jobs.models import Image, Job, JobStatus
from shared.jobs.schemas import GenerationParams, job_params
from shared.projects.limits import get_limiter
from shared.providers import (
    GeneratedImage,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
    get_provider,
)
from shared.providers.base import Generation
from shared.registry import ModelSpec, get_registry
from shared.traces.service import finish_call, normalise_usage
from shared.webhooks.events import record_job_event
from worker.leases import LEASES

log = logging.getLogger(__name__)


class JobCanceled(Exception):
    """The job was canceled (or taken over) while this attempt ran."""


@lru_cache
def _fanout_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=get_settings().worker_concurrency,
                              thread_name_prefix="fanout")


def claim(job_ids: list[str]) -> tuple[list[Job], str]:
    """Take the jobs for one attempt (one token for all); those finished or held by a
    live attempt are left out."""
    token = secrets.token_hex(16)
    now = utcnow()
    expires = now + timedelta(seconds=get_settings().job_lease_seconds)
    with session_scope() as session:
        # One statement: the guarded UPDATE hands back the rows it took.
        jobs = list(session.scalars(
            sa.update(Job)
            .where(col(Job.id).in_(job_ids))
            .where(sa.or_(col(Job.status) == JobStatus.queued,
                          sa.and_(col(Job.status) == JobStatus.running,
                                  col(Job.lease_expires_at) < now)))
            .values(status=JobStatus.running, attempts=Job.attempts + 1, lease_token=token,
                    lease_expires_at=expires,
                    started_at=sa.func.coalesce(Job.started_at, now))
            .returning(Job)
            .execution_options(synchronize_session=False)))
        deliveries: list[str] = []
        for job in jobs:
            # job.started once per job, not again when a crashed attempt is re-run.
            # Batch lines send no job events: their batch has its own.
            if job.attempts == 1 and job.batch_id is None:
                deliveries += record_job_event(session, job, [])
    publish_deliveries(deliveries)
    return jobs, token


@dataclass
class Result:
    """What one attempt produced, before the guarded transaction that records it."""

    job: Job
    values: dict[str, Any]
    images: list[Image] = field(default_factory=list)


def _finish(token: str, results: list[Result]) -> dict[str, str]:
    """The guarded end of an attempt, for one job or a chunk of batch lines: each job
    with its images, trace call, webhook events and batch line, in one transaction.
    Returns the status each job ended in ('discarded' when its lease was lost)."""
    now = utcnow()
    ended: dict[str, str] = {}
    deliveries: list[str] = []
    # Succeeded batch lines (the bulk of a big batch) are recorded with one
    # statement each for jobs, images and lines; the rest one by one below.
    bulk = [r for r in results if r.job.batch_id is not None
            and r.values["status"] == JobStatus.succeeded and not r.values.get("usage")]
    rest = [r for r in results if not any(r is b for b in bulk)]
    with session_scope() as session:
        if bulk:
            done = set(session.execute(
                sa.update(Job)
                .where(col(Job.id).in_([r.job.id for r in bulk]),
                       col(Job.status) == JobStatus.running, col(Job.lease_token) == token)
                .values(status=JobStatus.succeeded, finished_at=now, lease_token=None,
                        lease_expires_at=None)
                .returning(col(Job.id))
                .execution_options(synchronize_session=False)).scalars())
            rows = [image.model_dump() for r in bulk if r.job.id in done for image in r.images]
            if rows:
                session.execute(sa.insert(table(Image)), rows)
            lines_succeeded(session, [r.job.batch_item_id for r in bulk
                                      if r.job.id in done and r.job.batch_item_id])
            for r in bulk:
                ended[r.job.id] = JobStatus.succeeded if r.job.id in done else "discarded"
        for result in rest:
            job, values = result.job, result.values
            outcome = session.execute(
                sa.update(Job)
                .where(col(Job.id) == job.id, col(Job.status) == JobStatus.running,
                       col(Job.lease_token) == token)
                .values(finished_at=now, lease_token=None, lease_expires_at=None, **values)
            )
            if outcome.rowcount != 1:  # type: ignore[attr-defined]
                ended[job.id] = "discarded"  # canceled or taken over meanwhile
                continue
            ended[job.id] = str(values["status"])
            session.add_all(result.images)
            # The in-memory job now equals the row just written: no need to read it back.
            for name, value in {**values, "finished_at": now, "lease_token": None,
                                "lease_expires_at": None}.items():
                setattr(job, name, value)
            if job.batch_id is not None:
                item_finished(session, job)
                continue
            deliveries += record_job_event(session, job, result.images)
            usage = values.get("usage")
            succeeded = values["status"] == JobStatus.succeeded
            finish_call(
                session, job,
                output=_call_output(job, now, usage) if succeeded else None,
                exception=None if succeeded else str(values.get("error_message")),
                usage=usage,
            )
    publish_deliveries(deliveries)
    for result in results:
        job = result.job
        if ended[job.id] == "discarded":
            continue
        if job.batch_id is None:
            get_limiter().release_job(job.project_id, job.id)  # batch lines reserve none
        else:
            _BATCH_TICKS.call(job.batch_id, _batch_tick)
    return ended


def _call_output(job: Job, now: datetime, usage: Any) -> dict[str, Any]:
    """What a trace call keeps as output; image URLs are added fresh on read."""
    output: dict[str, Any] = {"created": int(now.timestamp()), "model": job.model}
    norm = normalise_usage(usage)
    if norm:
        output["usage"] = norm
    return output


def _call_with_retries(spec: ModelSpec, params: GenerationParams, count: int, first: int,
                       job_id: str) -> Generation:
    settings = get_settings()
    provider = get_provider(spec)
    attempt = 0
    while True:
        attempt += 1
        try:
            return provider.generate(spec, params, count, first)
        except TransientProviderError as exc:
            if attempt >= settings.provider_max_attempts:
                raise
            delay = exc.retry_after
            if delay is None:
                delay = settings.provider_backoff_seconds * 2 ** (attempt - 1)
                delay *= random.uniform(0.8, 1.2)
            delay = min(delay, settings.provider_backoff_max_seconds)
            log.info("job %s: %s; retry %d in %.1fs", job_id, exc.message, attempt, delay)
            _wait_unless_lost(job_id, delay)


def _generate(spec: ModelSpec, params: GenerationParams, job_id: str) -> Generation:
    """All ``n`` images, fanning out when the upstream makes fewer per call."""
    per_call = max(1, spec.batch_size)
    chunks = [(first, min(per_call, params.n - first)) for first in range(0, params.n, per_call)]
    if len(chunks) == 1:
        return _call_with_retries(spec, params, params.n, 0, job_id)
    futures = [_fanout_pool().submit(_call_with_retries, spec, params, count, first, job_id)
               for first, count in chunks]
    images: list[GeneratedImage] = []
    usage: dict[str, int] = {}
    errors: list[BaseException] = []
    for future in futures:  # wait for all, so no call outlives the attempt
        try:
            gen = future.result()
        except BaseException as exc:
            errors.append(exc)
            continue
        images += gen.images
        for key, value in (gen.usage or {}).items():
            if isinstance(value, int):
                usage[key] = usage.get(key, 0) + value
    if errors:
        permanent = [e for e in errors if isinstance(e, PermanentProviderError)]
        raise (permanent or errors)[0]
    return Generation(images=images, usage=usage or None)


def run_job(job_id: str) -> str:
    """Run the job if it can be claimed; returns the status it ended in (or 'skipped')."""
    return run_jobs([job_id]).get(job_id, "skipped")


def run_jobs(job_ids: list[str]) -> dict[str, str]:
    """Run the jobs that can be claimed (a chunk of batch lines, or one job), their
    provider calls side by side, and record them in one transaction."""
    jobs, token = claim(job_ids)
    if not jobs:
        return {}
    limit = get_settings().job_max_attempts
    exhausted = [job for job in jobs if job.attempts > limit]
    runnable = [job for job in jobs if job.attempts <= limit]
    for job in jobs:
        LEASES.hold(job.id, token)
    for job in runnable:
        if job.batch_id is None:
            publish_job_changed(job.id, JobStatus.running)
    try:
        produced: list[Result | None] = [_exhausted(job, limit) for job in exhausted]
        if len(runnable) == 1:
            produced.append(_produce(runnable[0]))
        elif runnable:
            produced += _lines_pool().map(_produce, runnable)
        ended = _record(token, [r for r in produced if r is not None])
    finally:
        for job in jobs:
            LEASES.release(job.id)
    for job in jobs:
        ended.setdefault(job.id, "discarded")
        if job.batch_id is None:
            publish_job_changed(job.id, ended[job.id])
    return ended


def _exhausted(job: Job, limit: int) -> Result:
    """A job claimed once more than it may be: it ends here, without a provider call.
    Its earlier attempts each ended without a result (a worker died, a lease was
    lost), so it would most likely fail the same way again."""
    last = f" The last error: {job.error_message}" if job.error_message else ""
    return Result(job, {"status": JobStatus.failed, "error_code": "max_attempts_exceeded",
                        "error_message": f"The job was attempted {limit} times without "
                                         f"finishing.{last}",
                        "attempts": limit})  # this claim ran nothing: not an attempt


def _record(token: str, results: list[Result]) -> dict[str, str]:
    """Record the attempt's results. While the database is unreachable, wait and try
    again (an outage delays a finished job; it does not cost another provider call).
    Any other failure to record (a value the database refuses) is recorded as the
    job's failure: it would fail the same way on every retry."""
    deadline = time.monotonic() + get_settings().record_retry_seconds
    delay = 0.5
    while True:
        try:
            return _finish(token, results)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("could not record %d job(s), database unreachable (%s); "
                        "trying again in %.1fs", len(results), type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        except Exception as exc:
            if len(results) > 1:  # a chunk of batch lines: one refused line fails alone
                ended: dict[str, str] = {}
                for result in results:
                    ended.update(_record(token, [result]))
                return ended
            if all(r.values["status"] == JobStatus.failed and not r.images for r in results):
                raise  # already the plainest record there is
            log.exception("could not record the result of %s",
                          ", ".join(r.job.id for r in results))
            message = (f"internal error: the result could not be recorded "
                       f"({type(exc).__name__})")
            results = [Result(r.job, {"status": JobStatus.failed,
                                      "error_code": "internal_error",
                                      "error_message": message}) for r in results]


@lru_cache
def _lines_pool() -> ThreadPoolExecutor:
    # Separate from the fan-out pool: a line's own fan-out must never wait for a
    # thread held by a line of the same chunk.
    return ThreadPoolExecutor(max_workers=get_settings().worker_concurrency,
                              thread_name_prefix="lines")


def _produce(job: Job) -> Result | None:
    """Generate and store the job's images; None when the attempt was canceled."""
    params = job_params(job)
    try:
        spec = get_registry().get(job.model)
        generation = _generate(spec, params, job.id)
        if LEASES.lost(job.id):
            raise JobCanceled()
        storage = get_storage()
        images = []
        for index, generated in enumerate(generation.images):
            encoded = encode(generated.data, params.output_format, params.output_compression)
            key = image_key(job.project_id, job.id, index, encoded.fmt)
            _store(storage, key, encoded.data, encoded.content_type, job.id)
            images.append(Image(
                project_id=job.project_id, job_id=job.id, index=index, storage_key=key,
                content_type=encoded.content_type, width=encoded.width, height=encoded.height,
                size_bytes=len(encoded.data), revised_prompt=generated.revised_prompt,
            ))
        return Result(job, {"status": JobStatus.succeeded, "usage": generation.usage}, images)
    except JobCanceled:
        return None
    except (ProviderError, UnreadableImage) as exc:
        code = exc.code if isinstance(exc, ProviderError) else "upstream_bad_response"
        message = exc.message if isinstance(exc, ProviderError) else str(exc)
        log.info("job %s failed: %s: %s", job.id, code, message)
        return Result(job, {"status": JobStatus.failed, "error_code": code,
                            "error_message": message})
    except Exception as exc:
        # Our own fault (storage down, a bug): fail the job visibly, never as an
        # empty success. The message names the kind of fault, not internals.
        log.exception("job %s crashed", job.id)
        return Result(job, {"status": JobStatus.failed, "error_code": "internal_error",
                            "error_message": f"internal error: {type(exc).__name__}"})


def _store(storage: Storage, key: str, data: bytes, content_type: str, job_id: str) -> None:
    """Upload, waiting out a storage outage: the job keeps its generated images
    (its lease renewed meanwhile) instead of failing or paying the provider again."""
    delay = 0.5
    while True:
        try:
            storage.put(key, data, content_type)
            return
        except StorageUnavailable as exc:
            log.warning("job %s: %s; trying again in %.1fs", job_id, exc, delay)
        _wait_unless_lost(job_id, delay)
        delay = min(delay * 2, get_settings().storage_backoff_max_seconds)


def _wait_unless_lost(job_id: str, seconds: float) -> None:
    """Sleep before a retry; raises JobCanceled as soon as the job's lease is lost."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if LEASES.lost(job_id):
            raise JobCanceled()
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def heartbeat_thread(stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=LEASES.run_forever, args=(stop,), name="lease-heartbeat",
                              daemon=True)
    thread.start()
    return thread


class _Throttle:
    """Runs ``fn(key)`` at most once per interval per key in this process, with a
    trailing call so the last event is never dropped. Topping a batch up and
    announcing its progress after every line cost a transaction and a publish per
    line; a few times a second is enough (the sweeper pumps too)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._trailing: set[str] = set()
        self._lock = threading.Lock()

    def call(self, key: str, fn: Callable[[str], object]) -> None:
        now = time.monotonic()
        with self._lock:
            wait = self._last.get(key, 0.0) + self.interval - now
            if wait > 0:
                if key not in self._trailing:
                    self._trailing.add(key)
                    timer = threading.Timer(wait, self._run_trailing, args=(key, fn))
                    # Not a daemon: a worker shutting down (warm) lets a tick finish.
                    # A tick may be finalizing a batch; cut off, the batch would sit
                    # in `finalizing` until the sweeper's 5-minute refinalize.
                    timer.daemon = False
                    timer.start()
                return
            self._last[key] = now
            if len(self._last) > 10_000:  # forget batches long finished
                self._last = {k: v for k, v in self._last.items() if now - v < 60}
        self._safe(fn, key)

    def _run_trailing(self, key: str, fn: Callable[[str], object]) -> None:
        with self._lock:
            self._trailing.discard(key)
            self._last[key] = time.monotonic()
        self._safe(fn, key)

    @staticmethod
    def _safe(fn: Callable[[str], object], key: str) -> None:
        try:
            fn(key)
        except Exception:  # the sweeper retries; never fail the job for this
            log.exception("batch tick for %s failed", key)


def _batch_tick(batch_id: str) -> None:
    publish_job_changed(batch_id, "progress")  # the batch's event stream
    pump(batch_id)


_BATCH_TICKS = _Throttle(0.2)
