"""At most a set number of jobs of a worker process hold provider answers in memory.

A worker holds thousands of provider calls in flight, each costing little while it
waits (about 96 KB). When they return together (a 30 s upstream answering 1,500
calls within a second) each answer is read, its base64 decoded, checked or
re-encoded and uploaded: all at once, that grew one worker from 356 to 655 MiB with
small images, and would be gigabytes with 1024x1024 ones. So a provider reads a
successful answer's body only once its job holds one of the process's answer slots
(``IMAGEGEN_WORKER_ANSWER_SLOTS``), and the job keeps the slot until its images are
stored; the other answers wait unread in their sockets, where the kernel's buffers
and TCP's flow control hold them instead of our memory. Peak memory is then about
slots x the largest job's images, whatever the calls in flight.

A job holds one slot whichever of its threads (a fanned-out call) takes it first;
taking it again is free. A provider called outside a job (a test, the CLI) takes
nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class AnswerSlot:
    """One job's claim on its process's slots: taken on its first answer, kept until
    the job's images are stored."""

    def __init__(self, slots: threading.Semaphore) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self._held = False

    def take(self) -> None:
        with self._lock:  # a fanned-out sibling waits here, then finds it held
            if self._held:
                return
            self._slots.acquire()
            self._held = True

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._slots.release()


_CURRENT: ContextVar[AnswerSlot | None] = ContextVar("answer_slot", default=None)


@contextmanager
def answer_slot(slots: threading.Semaphore) -> Iterator[AnswerSlot]:
    """The running job's slot, for providers called inside (in this context, and in
    threads run with a copy of it); released when the job leaves."""
    slot = AnswerSlot(slots)
    token = _CURRENT.set(slot)
    try:
        yield slot
    finally:
        _CURRENT.reset(token)
        slot.release()


def before_answer() -> None:
    """Called by a provider before it reads a successful answer's body (or makes
    its images, for one that makes them in the process): waits for the job's slot."""
    slot = _CURRENT.get()
    if slot is not None:
        slot.take()
