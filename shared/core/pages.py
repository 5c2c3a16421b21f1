"""Cursor pages over time-ordered ids (UUIDv7): newest first, ``after`` an id."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlmodel import Session
from sqlmodel.sql.expression import SelectOfScalar

T = TypeVar("T")


def newest_first(
    session: Session, query: SelectOfScalar[T], id_column: Any, *, limit: int, after: str | None
) -> tuple[list[T], bool]:
    """A page of ``query``'s rows, newest first, after the cursor ``after``; and
    whether more follow. Ids are UUIDv7, so descending id is newest first."""
    if after is not None:
        query = query.where(id_column < after)
    rows = list(session.exec(query.order_by(id_column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
