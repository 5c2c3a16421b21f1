"""What to send once a transaction commits: the in-process half of the outbox.

A service that changes state others must hear about (a job to run, a webhook
delivery to send, a "job changed" hint for waiters) records the change in SQL and
calls ``after_commit(session, send)``. ``unit_of_work`` runs the collected sends
after its commit succeeded and drops them on rollback, so no message ever names a
row that was not written, and no caller publishes by hand.

The row stays the truth: a send lost between the commit and the broker (a crash,
an outage) is repaired by the sweeper, which re-publishes from the rows.

Its mirror, ``after_rollback(session, undo)``, undoes a side effect taken outside
the database before the commit (a budget reserved in Redis for rows that were
then never written): run on rollback, dropped on commit.

The collector lives on the session (``Session.info``), not in a context variable:
FastAPI enters a sync dependency, runs the route and exits the dependency in
different threadpool threads, each with its own copy of the context, while the
session is the one object they all share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlmodel import Session

log = logging.getLogger(__name__)
_KEY = "imagegen.after_commit"
_UNDO = "imagegen.after_rollback"


def after_commit(session: Session, send: Callable[[], object]) -> None:
    """Run ``send`` once the session's transaction has committed (never if it rolls back)."""
    session.info.setdefault(_KEY, []).append(send)


def after_rollback(session: Session, undo: Callable[[], object]) -> None:
    """Run ``undo`` if the session's transaction rolls back (never if it commits)."""
    session.info.setdefault(_UNDO, []).append(undo)


def discard(session: Session) -> None:
    """The transaction rolled back: drop the sends, run the undos (best effort)."""
    session.info.pop(_KEY, None)
    for undo in session.info.pop(_UNDO, []):
        try:
            undo()
        except Exception:
            log.exception("undoing after rollback failed")


def flush_sends(session: Session) -> None:
    """Run the collected sends, in order. Each is best effort: one that fails is
    logged and the rest still run (the sweeper repairs what was not sent)."""
    session.info.pop(_UNDO, None)
    for send in session.info.pop(_KEY, []):
        try:
            send()
        except Exception:
            log.exception("sending after commit failed")
