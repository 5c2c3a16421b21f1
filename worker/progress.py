"""A running job's progress (local models' denoising steps), and the check that
stops it when it was canceled or its lease was lost.

Each report first looks at the lease book (in memory, every step); at most every
``IMAGEGEN_PROGRESS_INTERVAL_SECONDS`` (and at the last step) it writes the
progress with an UPDATE guarded by the attempt's lease token: no row updated means
the job is no longer this attempt's (canceled, or taken over), and the provider is
stopped with ``JobCanceled``. A cancel is so noticed within that interval and one
step, not at the next lease renewal. The write wakes the job's SSE streams.
"""

from __future__ import annotations

import logging
import threading
import time

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from shared.core.db import unit_of_work
from shared.core.errors import JobCanceled
from shared.core.events import publish_changed
from shared.core.settings import get_settings
from shared.jobs.models import Job, JobStatus
from worker.leases import LEASES

log = logging.getLogger(__name__)


class StepReporter:
    def __init__(self, job: Job) -> None:
        self.job_id = job.id
        self.token = job.lease_token
        self.interval = get_settings().progress_interval_seconds
        self._last = float("-inf")
        self._lock = threading.Lock()  # fanned-out calls of one job report together

    def __call__(self, step: int, steps: int) -> None:
        if LEASES.lost(self.job_id):
            raise JobCanceled()
        now = time.monotonic()
        with self._lock:
            if step < steps and now - self._last < self.interval:
                return
            self._last = now
        try:
            with unit_of_work() as session:
                result = session.execute(
                    sa.update(Job)
                    .where(
                        col(Job.id) == self.job_id,
                        col(Job.lease_token) == self.token,
                        col(Job.status) == JobStatus.running,
                    )
                    .values(progress={"step": step, "steps": steps})
                )
                updated = result.rowcount  # type: ignore[attr-defined]
        except SQLAlchemyError as exc:
            # Progress is a courtesy: the database being out must not stop the work
            # (the lease heartbeat decides whether the attempt is still ours).
            log.warning("job %s: progress not recorded: %s", self.job_id, exc)
            return
        if not updated:
            raise JobCanceled()
        publish_changed(self.job_id, JobStatus.running)
