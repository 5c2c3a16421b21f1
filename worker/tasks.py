"""Celery tasks: one line each, over the worker's steps."""

from __future__ import annotations

from celery import Celery

from shared.core.broker import Task
from shared.jobs.lifecycle import Outcome
from shared.retention.periodic import run_purge
from worker import upstream_jobs
from worker.batches import pump_batch, validate
from worker.runner import run_jobs
from worker.webhooks import deliver


def register(app: Celery, gpu: bool = False) -> None:
    """The tasks; ``gpu``: a consumer of local models' queues, whose jobs wait in
    their device's room and share its calls (worker/gpu/)."""
    run = run_jobs
    if gpu:
        from worker.gpu.consumer import run_local  # imports torch: GPU consumers only

        run = run_local

    @app.task(name=Task.run_job, acks_late=True, ignore_result=True)
    def run_job_task(job_id: str, reply: bool = False) -> str:
        return run([job_id], reply).get(job_id, Outcome.skipped)

    @app.task(name=Task.run_jobs, acks_late=True, ignore_result=True)
    def run_jobs_task(job_ids: list[str]) -> dict[str, Outcome]:
        return run(job_ids)

    @app.task(name=Task.deliver_webhook, acks_late=True, ignore_result=True)
    def deliver_webhook_task(delivery_id: str) -> str:
        return deliver(delivery_id)

    @app.task(name=Task.validate_batch, acks_late=True, ignore_result=True)
    def validate_batch_task(batch_id: str) -> None:
        validate(batch_id)

    @app.task(name=Task.pump_batch, acks_late=True, ignore_result=True)
    def pump_batch_task(batch_id: str) -> int:
        return pump_batch(batch_id)

    @app.task(name=Task.purge, acks_late=True, ignore_result=True)
    def purge_task() -> None:
        run_purge()

    @app.task(name=Task.cancel_upstream, acks_late=True, ignore_result=True)
    def cancel_upstream_task(job_id: str) -> int:
        return upstream_jobs.cancel(job_id)
