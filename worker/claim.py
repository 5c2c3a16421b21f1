"""Claiming jobs for one attempt: a guarded UPDATE that hands back the rows it took
(a job past its deadline ended instead)."""

from __future__ import annotations

import secrets
from datetime import timedelta

from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
from shared.jobs import lifecycle
from shared.jobs.models import Job
from shared.jobs.service import end_overdue
from shared.webhooks.events import record_job_event


def claim(job_ids: list[str]) -> tuple[list[Job], str]:
    """Take the jobs for one attempt (one token for all); those finished or held by a
    live attempt are left out."""
    token = secrets.token_hex(16)
    now = utcnow()
    expires = now + timedelta(seconds=get_settings().job_lease_seconds)
    with unit_of_work() as session:
        jobs = lifecycle.claim(session, job_ids, token, now, expires)
        if len(jobs) < len(job_ids):
            # The claim refuses a job past its deadline (Cancel-After): it ends
            # here, never sent upstream. Only looked for when some were refused, so
            # the hot path's claim stays one statement.
            taken = {job.id for job in jobs}
            end_overdue(session, [job_id for job_id in job_ids if job_id not in taken], now)
        for job in jobs:
            # job.started once per job, not again when a crashed attempt is re-run.
            # Batch lines send no job events: their batch has its own.
            if job.attempts == 1 and job.batch_id is None:
                record_job_event(session, job, [])
    return jobs, token
