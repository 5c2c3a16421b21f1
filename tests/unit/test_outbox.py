"""The unit of work sends what a service collected only after its commit."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import shared.core.db
from shared.core.db import unit_of_work
from shared.core.outbox import after_commit, after_rollback


@pytest.fixture(autouse=True)
def memory_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = sa.create_engine("sqlite://")
    monkeypatch.setattr(shared.core.db, "get_engine", lambda: engine)


def test_sends_run_after_the_commit_in_order() -> None:
    sent: list[str] = []
    with unit_of_work() as session:
        after_commit(session, lambda: sent.append("job"))
        after_commit(session, lambda: sent.append("webhook"))
        assert sent == []  # nothing leaves before the commit
    assert sent == ["job", "webhook"]


def test_a_rollback_drops_what_was_collected() -> None:
    sent: list[str] = []

    def failing_route() -> None:
        with unit_of_work() as session:
            after_commit(session, lambda: sent.append("job"))
            raise RuntimeError("the route failed")

    with pytest.raises(RuntimeError):
        failing_route()
    assert sent == []


def test_a_failing_send_does_not_stop_the_others() -> None:
    sent: list[str] = []

    def broken() -> None:
        raise ConnectionError("broker down")

    with unit_of_work() as session:
        after_commit(session, broken)
        after_commit(session, lambda: sent.append("webhook"))
    assert sent == ["webhook"]


def test_undos_run_on_rollback_only() -> None:
    """A side effect taken before the commit (a budget reserved in Redis) is given
    back when the transaction rolls back, and kept when it commits."""
    undone: list[str] = []
    with unit_of_work() as session:
        after_rollback(session, lambda: undone.append("kept"))
    assert undone == []

    def failing_pump() -> None:
        with unit_of_work() as session:
            after_rollback(session, lambda: undone.append("reservation"))
            after_commit(session, lambda: undone.append("never sent"))
            raise RuntimeError("the commit failed")

    with pytest.raises(RuntimeError):
        failing_pump()
    assert undone == ["reservation"]
