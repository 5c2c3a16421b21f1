"""Leases of the jobs this process is running, renewed by one heartbeat thread.

A worker that dies stops renewing; the sweeper then re-queues its jobs. The
heartbeat also notices a cancel so a running job can stop early.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.settings import get_settings
from shared.jobs import lifecycle

log = logging.getLogger(__name__)


class LeaseBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # job id -> lease token
        self._lost: set[str] = set()  # jobs whose lease is no longer ours (canceled, taken over)

    def hold(self, job_id: str, token: str) -> None:
        with self._lock:
            self._held[job_id] = token
            self._lost.discard(job_id)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._lost.discard(job_id)

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
        with self._lock:
            held = dict(self._held)
        if not held:
            return
        expires = utcnow() + timedelta(seconds=get_settings().job_lease_seconds)
        with unit_of_work() as session:
            still = lifecycle.renew(session, held, expires)
        with self._lock:
            self._lost |= {job_id for job_id in held if job_id not in still}

    def run_forever(self, stop: threading.Event) -> None:
        interval = max(0.2, get_settings().job_lease_seconds / 3)
        while not stop.wait(interval):
            try:
                self.renew()
            except Exception:
                log.exception("lease renewal failed")


LEASES = LeaseBook()
