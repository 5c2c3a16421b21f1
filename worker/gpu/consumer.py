"""A GPU consumer's Celery task: the message's jobs of local models enter their
device's room (room.py), and each is stored and recorded here, on the task's
thread, once its call made its images. Jobs of other models on the same queue run
as on any consumer (worker/runner.py)."""

from __future__ import annotations

import logging
from concurrent.futures import as_completed

import sqlalchemy as sa
from sqlmodel import col

from shared.core.db import unit_of_work
from shared.core.errors import ImagegenError, PermanentProviderError
from shared.jobs.lifecycle import Outcome
from shared.jobs.models import Job, JobStatus
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Generation
from shared.providers.local.diffusion import plan_of
from shared.providers.local.pipelines import resolve_device
from shared.registry import DiffusersModel, get_registry
from worker.gpu.room import Handed, Ticket, room_for
from worker.gpu.turns import Waiting
from worker.produce import produce
from worker.runner import finish, run_jobs, spent

log = logging.getLogger(__name__)


def run_local(job_ids: list[str], reply: bool = False) -> dict[str, Outcome]:
    """Run the jobs (one, or a chunk of batch lines) through their device's room;
    returns how each ended (none for a job that was not this message's to run)."""
    with unit_of_work() as session:
        rows = session.execute(
            sa.select(
                col(Job.id), col(Job.project_id), col(Job.batch_id), col(Job.model), col(Job.queue)
            )
            .add_columns(col(Job.request))
            .where(
                col(Job.id).in_(job_ids),
                col(Job.status).in_((JobStatus.queued, JobStatus.running)),
            )
        ).all()
    arrivals: dict[str, list[Ticket]] = {}
    others: list[str] = []
    registry = get_registry()
    for job_id, project_id, batch_id, model, queue, request in rows:
        try:
            spec = registry.get(model)
        except ImagegenError:
            spec = None
        if not isinstance(spec, DiffusersModel):
            others.append(job_id)  # the usual path ends it (a model gone fails there)
            continue
        params = GenerationParams.model_validate(request)
        try:
            plan: object = (spec.name, plan_of(spec, params))
        except PermanentProviderError:
            plan = ("alone", job_id)  # the scheduler fails it, on its own
        waiting = Waiting(
            job_id, project_id, batch_id is None, plan, params.n, spec.max_batch_images
        )
        ticket = Ticket(waiting, spec.batch_wait_ms / 1000, queue, reply)
        arrivals.setdefault(str(resolve_device(spec)), []).append(ticket)
    tickets = [t for device, jobs in arrivals.items() for t in room_for(device).enter(jobs)]
    ended: dict[str, Outcome] = {}
    failed: list[Exception] = []
    if others:
        try:
            ended.update(run_jobs(others, reply))
        except Exception as exc:  # the room's jobs are answered all the same
            failed.append(exc)
    # Each job answered, whatever another's end: a job claimed and never finished
    # would hold its lease for the life of the process.
    for future in as_completed([ticket.handed for ticket in tickets]):
        try:
            handed = future.result()
            if handed.job is not None:
                ended[handed.job.id] = record_handed(handed, reply)
        except Exception as exc:  # its lease released: the sweeper re-queues it
            log.exception("a job of this message could not be finished")
            failed.append(exc)
    if failed:
        raise failed[0]
    return ended


def record_handed(handed: Handed, reply: bool = False) -> Outcome:
    """Store and record one job's end (its images, or its failure)."""
    job = handed.job
    assert job is not None
    if handed.spent:
        return finish([job], handed.token, [spent(job)], reply)[job.id]

    def made() -> tuple[Generation, dict[str, int] | None]:
        if isinstance(handed.made, BaseException):
            raise handed.made
        assert handed.made is not None
        return handed.made

    return finish([job], handed.token, [produce(job, made)], reply)[job.id]
