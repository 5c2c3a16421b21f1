"""Claiming jobs for one attempt: a guarded UPDATE that hands back the rows it took."""

from __future__ import annotations

import secrets
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import col

from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
from shared.jobs.models import Job, JobStatus
from shared.webhooks.events import record_job_event


def claim(job_ids: list[str]) -> tuple[list[Job], str]:
    """Take the jobs for one attempt (one token for all); those finished or held by a
    live attempt are left out."""
    token = secrets.token_hex(16)
    now = utcnow()
    expires = now + timedelta(seconds=get_settings().job_lease_seconds)
    with unit_of_work() as session:
        # One statement: the guarded UPDATE hands back the rows it took.
        jobs = list(
            session.scalars(
                sa.update(Job)
                .where(col(Job.id).in_(job_ids))
                .where(
                    sa.or_(
                        col(Job.status) == JobStatus.queued,
                        sa.and_(
                            col(Job.status) == JobStatus.running, col(Job.lease_expires_at) < now
                        ),
                    )
                )
                .values(
                    status=JobStatus.running,
                    attempts=Job.attempts + 1,
                    lease_token=token,
                    lease_expires_at=expires,
                    started_at=sa.func.coalesce(Job.started_at, now),
                    progress=None,  # a new attempt starts its steps again
                    status_detail=None,
                )
                .returning(Job)
                .execution_options(synchronize_session=False)
            )
        )
        for job in jobs:
            # job.started once per job, not again when a crashed attempt is re-run.
            # Batch lines send no job events: their batch has its own.
            if job.attempts == 1 and job.batch_id is None:
                record_job_event(session, job, [])
    return jobs, token
