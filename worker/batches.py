"""The worker's batch steps: each a transaction of its own over the batch service.

``pump_batch`` tops a batch up and finalizes it once nothing is left to run; the
API enqueues it (after a cancel or a native batch), the batch tick and the
sweeper call it. Finalizing uploads the output files, which is why it never
runs in a request.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlmodel import Session

from shared.batches.models import BatchStatus
from shared.batches.pump import pump
from shared.batches.results import finalizing_intent, start_finalizing, write_results
from shared.batches.service import validate_batch
from shared.core.db import unit_of_work
from shared.core.events import publish_changed
from worker.throttle import Throttle


def validate(batch_id: str) -> None:
    with unit_of_work() as session:
        has_lines = validate_batch(session, batch_id)
    if has_lines:
        pump_batch(batch_id)


def pump_batch(batch_id: str) -> int:
    """Start the lines there is room for; finalize the batch when none is left."""
    with unit_of_work() as session:
        pumped = pump(session, batch_id)
    if pumped.finished:
        finalize(batch_id)
    return pumped.started


def finalize(batch_id: str) -> None:
    """Guarded: of several finalizers, one writes the files."""
    _finalize(batch_id, start_finalizing)


def refinalize(batch_id: str) -> None:
    """A finalizer died half-way (the sweeper noticed): write the files again."""
    _finalize(batch_id, finalizing_intent)


def _finalize(batch_id: str, decide: Callable[[Session, str], BatchStatus | None]) -> None:
    """``decide`` (in its own transaction) the status the batch ends in, if any;
    then write its files and that status (in another)."""
    with unit_of_work() as session:
        final = decide(session, batch_id)
    if final is not None:
        with unit_of_work() as session:
            write_results(session, batch_id, final)


def batch_tick(batch_id: str) -> None:
    publish_changed(batch_id, "progress")  # the batch's event stream
    pump_batch(batch_id)


BATCH_TICKS = Throttle(0.2)
