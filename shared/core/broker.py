"""The Celery app both sides share, and the one way a job is published.

The API only ever sends ``imagegen.run_job(job_id)`` after the job's row is
committed; the message carries no state, so losing or repeating one is harmless.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from celery import Celery

from shared.core.settings import Settings, get_settings

log = logging.getLogger(__name__)


class Task(StrEnum):
    """Every task's name: what the API and the sweeper publish, what worker/tasks.py
    registers."""

    run_job = "imagegen.run_job"
    run_jobs = "imagegen.run_jobs"
    deliver_webhook = "imagegen.deliver_webhook"
    validate_batch = "imagegen.validate_batch"
    pump_batch = "imagegen.pump_batch"
    cancel_upstream = "imagegen.cancel_upstream"
    purge = "imagegen.purge"


WEBHOOK_QUEUE = "webhooks"
# The longest countdown a message is published with. The consumer that takes a
# countdown message holds it unacked until it is due and its task has run (acks
# late), and RabbitMQ closes the channel of a consumer that holds a delivery past its
# consumer_timeout (30 min by default): Celery then stops the whole consumer
# (PreconditionFailed is unrecoverable to it; reproduced with Celery 5.7), and every
# message it held is delivered again. A job whose wait is longer (an upstream's
# Retry-After of an hour) comes back sooner, finds no room yet and is deferred again,
# its attempt not counted; 10 min leaves 20 for the task's own run.
MAX_COUNTDOWN_SECONDS = 600.0


def make_celery(settings: Settings) -> Celery:
    broker = settings.resolved_broker_url
    if settings.embedded_broker:
        from shared.core.fs_broker import SCHEME  # registers the atomic-write transport

        broker = f"{SCHEME}://"
    app = Celery("imagegen", broker=broker, set_as_current=True)
    app.conf.update(
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # Ride out a broker outage of any length (Celery's default gives up after
        # 100 tries and shuts the worker down).
        broker_connection_max_retries=None,
        broker_connection_timeout=2,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_default_queue="default",
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0.2,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_heartbeat=0,
    )
    return app


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


def _transport_options(settings: Settings) -> dict[str, Any]:
    """What each broker's kombu transport is told beyond the URL."""
    if settings.embedded_broker:
        # kombu's filesystem transport: no server needed; about 900 jobs/s at 50 ms polling.
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # Exchange tables too (kombu's default is ./control, in the working dir).
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_polling_interval,
        }
    if not _is_redis(settings.resolved_broker_url):
        # RabbitMQ (amqp://, py-amqp): nothing to add. A publish with the broker down
        # fails within broker_connection_timeout; a dead peer is found by the TCP
        # keepalive py-amqp sets on its sockets (AMQP heartbeats stay off, as
        # broker_heartbeat says). Acks are real here, unlike Redis: how that changes
        # redelivery is in docs/operations.md ("RabbitMQ as the broker").
        return {}
    return {
        # Short socket timeouts: with the broker down, a publish fails fast and
        # the job waits for the sweeper instead of the request hanging.
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
        # No ack emulation: a message leaves Redis when a worker takes it, and
        # acks never touch Redis. With it, kombu 5.7 / Celery 5.7 crash the whole
        # worker on a broker outage: on connection loss the consumer collects the
        # connection (dropping its transport's client) and then closes it, and the
        # close restores unacked messages through that client ->
        # AttributeError("'NoneType' object has no attribute 'hostname'"), which
        # Celery treats as unrecoverable (reproduced; the worker exited 0). Acks
        # arriving on the old channel after a reconnect hit the same path. We lose
        # nothing by it: SQL leases decide who runs a job, and the sweeper
        # re-publishes jobs whose message was taken by a worker that then died.
        "ack_emulation": False,
    }


def get_celery() -> Celery:
    """The process's Celery app (its context's)."""
    from shared.core.context import current  # the context is made of this module's parts

    return current().celery


def publish(
    task: Task,
    args: list[Any],
    queue: str,
    kwargs: dict[str, Any] | None = None,
    countdown: float | None = None,
) -> bool:
    """The one way a task is published: False when the broker cannot take it now,
    logged, never raised. Losing a message is harmless: the row it names is the
    truth, and the sweeper publishes again what is still due (a job, a delivery, a
    batch's step).

    Through Celery's own path. Until issue 25 a Redis broker got the message as a
    hand-built kombu envelope pushed with one LPUSH: 106 us of CPU per publish
    against Celery's 296 us here, about 2% of the 10 ms of CPU a request costs the
    service with an instant upstream (bench_proxy), and nothing beside a provider
    taking seconds; Celery's path follows Celery and kombu upgrades, and any broker.

    ``countdown``: run it no sooner than that many seconds from now (a job waiting
    for room at its upstreams), and no later than ``MAX_COUNTDOWN_SECONDS``. The
    consumer holds such a message, not a worker slot, until it is due."""
    if countdown is not None:
        countdown = min(countdown, MAX_COUNTDOWN_SECONDS)
    try:
        get_celery().send_task(task, args=args, kwargs=kwargs, queue=queue, countdown=countdown)
    except Exception as exc:  # kombu and redis raise many types for an unreachable broker
        log.warning("broker did not take %s %s: %s", task, args, exc)
        return False
    return True


def publish_job(
    job_id: str, queue: str, reply: bool = False, countdown: float | None = None
) -> bool:
    """Hand "run job X" to the broker. ``reply``: a request waits for the job
    (shared/jobs/replies.py)."""
    return publish(Task.run_job, [job_id], queue, {"reply": True} if reply else None, countdown)


def publish_jobs(job_ids: list[str], queue: str) -> bool:
    """One message for a chunk of jobs (batch lines)."""
    return publish(Task.run_jobs, [job_ids], queue)


def publish_deliveries(delivery_ids: list[str]) -> None:
    for delivery_id in delivery_ids:
        publish(Task.deliver_webhook, [delivery_id], WEBHOOK_QUEUE)


def publish_batch_validation(batch_id: str) -> None:
    publish(Task.validate_batch, [batch_id], get_settings().batch_queue)


def publish_batch_pump(batch_id: str) -> None:
    """Start (or drain) a batch's lines, and finalize it once none is left: heavy
    work a request never does inline."""
    publish(Task.pump_batch, [batch_id], get_settings().batch_queue)


def publish_upstream_cancel(job_id: str, queue: str) -> None:
    """Ask a worker to cancel a canceled job's jobs at its queue provider."""
    publish(Task.cancel_upstream, [job_id], queue)


def publish_purge() -> None:
    """One pass of the purge (shared/retention/), on the default queue."""
    publish(Task.purge, [], "default")


def queue_size(queue: str) -> int | None:
    """Messages waiting in ``queue`` (not those reserved by a worker); None if unknown."""
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=0)  # one try: no 2 s sleep before failing
            # Not passive: after a broker restart the queue is not declared yet, and
            # declaring an (empty) queue we publish to anyway is harmless.
            ok = conn.default_channel.queue_declare(queue=queue, durable=True, auto_delete=False)
            return int(ok.message_count)
    except Exception as exc:  # kombu raises many types for an unreachable broker
        log.debug("could not size queue %s: %s", queue, exc)
        return None
