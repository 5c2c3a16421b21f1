"""The waiting room of one device and the scheduler thread that serves it.

A job enters when its message reaches the GPU consumer and stays ``queued`` (its
row untouched) while it waits: its queue position counts the jobs served before it
(shared/jobs/service.py:queue_position), and a cancel meanwhile only ends the row,
which the scheduler's claim then refuses. The scheduler takes the next call's jobs
(turns.py), claims them in one statement, runs their pipeline call and hands each
job's task thread its images (a future), then takes the next call at once: storing
and recording run on the task threads while the device works.

Companions are waited for only when the device was just freed and the call is not
full, for at most the model's ``batch_wait_ms``; a job that finds the device idle
starts at once, alone.

A job waits here at most half of ``redeliver_after_seconds`` (150 s by default):
past it, it is handed back, published again to the broker and its message here
acked. So no message stays unacked long enough for RabbitMQ's consumer_timeout
(30 min) or Redis' visibility timeout to take it back, and the sweeper, which
re-publishes queued jobs whose last publish is older than that setting, never
duplicates one waiting here. (Its turn is kept: the order is by job id.) A warm
shutdown hands back every waiting job the same way at once, so the call under
way is all it waits for.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from shared.core.broker import publish_job
from shared.core.clock import utcnow
from shared.core.db import unit_of_work
from shared.core.instruments import PROVIDER_SECONDS
from shared.core.settings import get_settings
from shared.jobs import lifecycle
from shared.jobs.models import Job
from shared.jobs.schemas import job_params
from shared.providers.base import GeneratedImage, Generation, no_partials
from shared.providers.local.diffusion import Member, make, plan_of, seeds_of
from shared.registry import DiffusersModel, get_registry
from worker.claim import claim
from worker.gpu.turns import Waiting, fair_order, next_call
from worker.leases import LEASES
from worker.produce import job_inputs, partial_sink
from worker.progress import StepReporter
from worker.runner import start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handed:
    """What the scheduler hands a job's task thread: the job as claimed (None: not
    claimed, it ended or another attempt holds it), and its images or why not."""

    job: Job | None
    token: str = ""
    spent: bool = False  # claimed past its attempts: ends without a call
    made: tuple[Generation, dict[str, int] | None] | BaseException | None = None


@dataclass(eq=False)
class Ticket:
    waiting: Waiting
    wait_seconds: float  # its model's batch_wait_ms
    queue: str
    reply: bool  # a request waits for it (published again so)
    handed: Future[Handed] = field(default_factory=Future)
    entered: float = field(default_factory=time.monotonic)


class Room:
    """The jobs waiting for one device, and the thread that serves them."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._cond = threading.Condition()
        self._tickets: dict[str, Ticket] = {}
        self._served: dict[str, int] = {}  # project -> the call that last served it
        self._calls = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def enter(self, arrivals: list[Ticket]) -> list[Ticket]:
        """Wait for the device, together (a message's jobs: a chunk of batch lines
        is seen whole by the next call). A job waiting already (a duplicate
        message) is left out: the first message's thread answers for it."""
        tickets = []
        with self._cond:
            if self._closed:
                closed = arrivals
            else:
                closed = []
                for ticket in arrivals:
                    if ticket.waiting.job_id not in self._tickets:
                        self._tickets[ticket.waiting.job_id] = ticket
                        tickets.append(ticket)
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"gpu-{self.device}", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
        _hand_back(closed)
        return [*tickets, *closed]

    def close(self) -> None:
        """A warm shutdown: every waiting job handed back to the broker, and any
        that arrives after; the call under way finishes."""
        with self._cond:
            self._closed = True
            waiting = list(self._tickets.values())
            self._tickets.clear()
        _hand_back(waiting)

    def _run(self) -> None:
        freed = False
        while True:
            tickets: list[Ticket] = []
            try:
                tickets, stale = self._take(freed)
                _hand_back(stale)
                self._serve(tickets)
            except BaseException as exc:  # never leave a task thread waiting
                log.exception("device %s: a call for %d jobs failed", self.device, len(tickets))
                for ticket in tickets:
                    if not ticket.handed.done():
                        LEASES.release(ticket.waiting.job_id)  # held since its claim
                        ticket.handed.set_exception(exc)
            freed = True

    def _take(self, freed: bool) -> tuple[list[Ticket], list[Ticket]]:
        """The next call's jobs, out of the room, and those that waited too long
        (to hand back); waits for a first job, and for companions when the device
        was just ``freed``."""
        with self._cond:
            while not self._tickets:
                self._cond.wait()
                freed = False  # it was idle: the first job starts at once
            order = fair_order([t.waiting for t in self._tickets.values()], self._served)
            chosen = next_call(order)
            if freed and _room_left(chosen):
                deadline = time.monotonic() + self._tickets[chosen[0].job_id].wait_seconds
                while _room_left(chosen) and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                    order = fair_order([t.waiting for t in self._tickets.values()], self._served)
                    chosen = next_call(order)
            self._calls += 1
            for job in chosen:
                self._served[job.project_id] = self._calls
            taken = [self._tickets.pop(job.job_id) for job in chosen]
            # The next call chosen first, over every waiting job: one handed back
            # comes in again while this call runs, in time for its turn at the next
            # (so a call longer than the limit hands jobs back, never starves them).
            limit = time.monotonic() - get_settings().redeliver_after_seconds / 2
            stale = [t for t in self._tickets.values() if t.entered < limit]
            for ticket in stale:
                del self._tickets[ticket.waiting.job_id]
            return taken, stale

    def _serve(self, tickets: list[Ticket]) -> None:
        if not tickets:
            return
        jobs, token = claim([t.waiting.job_id for t in tickets])
        claimed = {job.id: job for job in jobs}
        runnable = {job.id for job in start(jobs, token)}
        members: list[tuple[Ticket, Job, StepReporter, Member]] = []
        for ticket in tickets:
            job = claimed.get(ticket.waiting.job_id)
            if job is None or job.id not in runnable:
                ticket.handed.set_result(Handed(job, token, spent=job is not None))
                continue
            params = job_params(job)
            reporter = StepReporter(job)
            member = Member(
                job=job.id,
                prompt=params.prompt,
                seeds=seeds_of(params, 0, params.n),
                progress=reporter,
                partials=partial_sink(job, params) or no_partials,
                partial_images=params.partial_images,
                inputs=job_inputs(params),
            )
            members.append((ticket, job, reporter, member))
        if not members:
            return
        first = members[0][1]
        try:
            spec = get_registry().get(first.model)
            assert isinstance(spec, DiffusersModel)  # only local models' jobs enter
            started = time.monotonic()
            made = make(spec, plan_of(spec, job_params(first)), [m for *_, m in members])
            PROVIDER_SECONDS.labels(spec.name).observe(time.monotonic() - started)
        except Exception as exc:  # no such model any more, a plan it cannot make
            made = {member.job: exc for *_, member in members}
        for ticket, job, reporter, member in members:
            outcome = made[member.job]
            if isinstance(outcome, BaseException):
                ticket.handed.set_result(Handed(job, token, made=outcome))
            else:
                images = [GeneratedImage(data=data) for data in outcome]
                ticket.handed.set_result(
                    Handed(job, token, made=(Generation(images=images), reporter.final))
                )


def _hand_back(tickets: list[Ticket]) -> None:
    """Jobs that leave the room unserved: published again (a refused publish
    leaves them to the sweeper at once), their messages here answered."""
    if not tickets:
        return
    published = [
        t.waiting.job_id for t in tickets if publish_job(t.waiting.job_id, t.queue, t.reply)
    ]
    # Marked published now, so the sweeper (stale marks) does not publish them too.
    try:
        with unit_of_work() as session:
            lifecycle.mark_published(session, published, utcnow())
            for ticket in tickets:
                if ticket.waiting.job_id not in published:
                    lifecycle.mark_unpublished(session, ticket.waiting.job_id)
    except SQLAlchemyError as exc:  # the sweeper finds them by their old marks
        log.warning("could not mark %d jobs handed back: %s", len(tickets), exc)
    log.info("device room: %d jobs handed back to the broker", len(tickets))
    for ticket in tickets:
        ticket.handed.set_result(Handed(None))


def close_rooms() -> None:
    """Every room closed (a warm shutdown: Celery's worker_shutting_down)."""
    with _rooms_lock:
        rooms = list(_rooms.values())
    for room in rooms:
        room.close()


def _room_left(chosen: list[Waiting]) -> bool:
    return sum(job.images for job in chosen) < chosen[0].room


_rooms: dict[str, Room] = {}
_rooms_lock = threading.Lock()


def room_for(device: str) -> Room:
    with _rooms_lock:
        return _rooms.setdefault(device, Room(device))
