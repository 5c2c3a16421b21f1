"""The lease heartbeat keeps a held job's deadline (issue 29: Cancel-After) to a
fraction of a second, not to its next beat (a third of the lease: 20 s by
default); the beat that ends the job is worker/leases.py's renew, against the
database (tests/service/test_deadlines.py)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from shared.core.clock import utcnow
from worker.leases import LeaseBook


class _Beats(LeaseBook):
    """A lease book whose beats are recorded instead of written; a beat deals with
    the deadlines that passed, as the real one does."""

    def __init__(self) -> None:
        super().__init__()
        self.beats: list[float] = []

    def renew(self) -> None:
        self.beats.append(time.monotonic())
        now = utcnow()
        for job_id, deadline in list(self._deadlines.items()):
            if deadline <= now:
                self._deadlines.pop(job_id)


def test_the_heartbeat_beats_at_a_held_jobs_deadline() -> None:
    book = _Beats()
    stop = threading.Event()
    thread = threading.Thread(target=book.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        held = time.monotonic()
        book.hold("job_a", "token", utcnow() + timedelta(seconds=0.3))
        book.hold("job_b", "token")  # no deadline: beats on the interval only
        while not book.beats and time.monotonic() - held < 5:
            time.sleep(0.01)
        assert book.beats, "no beat at the deadline"
        assert 0.25 <= book.beats[0] - held < 1.0
        time.sleep(0.3)
        assert len(book.beats) == 1  # dealt with: no beat again until the interval
    finally:
        stop.set()
        thread.join(2)
    assert not thread.is_alive()  # a stop ends it at once, not after the interval


class _Down(LeaseBook):
    """A lease book whose database is out: every renewal fails, so a deadline that
    passed stays due."""

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    def renew(self) -> None:
        self.tries += 1
        raise ConnectionError("database down")


def test_a_failing_renewal_past_a_deadline_is_retried_paced_and_stops_at_once() -> None:
    book = _Down()
    book.hold("job_a", "token", utcnow() - timedelta(seconds=1))  # already overdue
    stop = threading.Event()
    thread = threading.Thread(target=book.run_forever, args=(stop,), daemon=True)
    thread.start()
    time.sleep(0.5)
    stop.set()
    thread.join(2)
    assert not thread.is_alive()  # heard the stop while the database was down
    assert 1 <= book.tries <= 2  # once, then a second's pause: not a hot loop
