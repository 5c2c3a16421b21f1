"""Leases of the jobs this process is running, renewed by one heartbeat thread.

A worker that dies stops renewing; the sweeper then re-queues its jobs. The
heartbeat also notices a cancel so a running job can stop early, and ends a job
whose deadline (Cancel-After) passed: it beats at that moment too, so a deadline
is kept to about a second, not to the next beat.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import datetime, timedelta

from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
from shared.jobs import lifecycle
from shared.jobs.service import end_overdue

log = logging.getLogger(__name__)


class LeaseBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # job id -> lease token
        self._lost: set[str] = set()  # jobs whose lease is no longer ours (canceled, taken over)
        self._deadlines: dict[str, datetime] = {}  # job id -> its Cancel-After deadline

    def hold(self, job_id: str, token: str, deadline: datetime | None = None) -> None:
        with self._lock:
            self._held[job_id] = token
            self._lost.discard(job_id)
            if deadline is not None:
                self._deadlines[job_id] = deadline

    def holds(self, job_id: str) -> bool:
        """Whether this process holds (and renews) the job's lease."""
        with self._lock:
            return job_id in self._held

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._lost.discard(job_id)
            self._deadlines.pop(job_id, None)

    def lose(self, job_id: str, token: str) -> None:
        """Someone found the job is no longer this attempt's (canceled, taken over)."""
        with self._lock:
            if self._held.get(job_id) == token:
                self._lost.add(job_id)

    def token(self, job_id: str) -> str | None:
        """The lease token this process holds the job by, if it does."""
        with self._lock:
            return self._held.get(job_id)

    def lost(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._lost

    def renew(self) -> None:
        now = utcnow()
        with self._lock:
            held = dict(self._held)
            overdue = [
                job_id
                for job_id, deadline in self._deadlines.items()
                if job_id in held and deadline <= now
            ]
        if not held:
            return
        expires = now + timedelta(seconds=get_settings().job_lease_seconds)
        with unit_of_work() as session:
            # Past their deadline: ended (canceled, deadline_exceeded) and so lost,
            # which stops their attempts at their next look (worker/produce.py).
            if overdue:
                end_overdue(session, overdue, now)
            still = lifecycle.renew(session, held, expires)
        with self._lock:
            self._lost |= {job_id for job_id in held if job_id not in still}
            for job_id in overdue:  # dealt with: no beat waits on it again
                self._deadlines.pop(job_id, None)

    def _until_deadline(self) -> float:
        """Seconds to the nearest held deadline (infinite when none)."""
        with self._lock:
            nearest = min(self._deadlines.values(), default=None)
        return math.inf if nearest is None else (nearest - utcnow()).total_seconds()

    def run_forever(self, stop: threading.Event) -> None:
        interval = max(0.2, get_settings().job_lease_seconds / 3)
        while True:
            # Beat every interval, or at a held deadline should one come first (looked
            # at every half second: a job held meanwhile may bring a nearer one).
            due = time.monotonic() + interval
            while (wait := min(due - time.monotonic(), self._until_deadline())) > 0:
                if stop.wait(min(wait, 0.5)):
                    return
            try:
                self.renew()
            except Exception:
                log.exception("lease renewal failed")
                # The database is out: a deadline that passed stays due (it is
                # dropped only once ended), so without this wait the loop would try
                # again at once, flat out, for the whole outage, deaf to ``stop``.
                if stop.wait(min(interval, RETRY_AFTER_FAILURE_SECONDS)):
                    return


# After a failed renewal the heartbeat tries again this soon at the earliest.
RETRY_AFTER_FAILURE_SECONDS = 1.0

LEASES = LeaseBook()
