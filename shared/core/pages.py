"""Reading a project's rows: one by id (``owned``), or a cursor page over
time-ordered ids (UUIDv7: newest first, ``after`` an id)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlmodel import Session, SQLModel
from sqlmodel.sql.expression import SelectOfScalar

T = TypeVar("T")
M = TypeVar("M", bound=SQLModel)


def owned(
    session: Session, model: type[M], project_id: str, object_id: str, not_found: Exception
) -> M:
    """The row with this id if it belongs to the project and is not soft-deleted;
    otherwise ``not_found`` (another project's row is as absent as a missing one)."""
    row = session.get(model, object_id)
    if (
        row is None
        or getattr(row, "project_id", None) != project_id
        or getattr(row, "deleted_at", None) is not None
    ):
        raise not_found
    return row


def newest_first(
    session: Session, query: SelectOfScalar[T], id_column: Any, *, limit: int, after: str | None
) -> tuple[list[T], bool]:
    """A page of ``query``'s rows, newest first, after the cursor ``after``; and
    whether more follow. Ids are UUIDv7, so descending id is newest first."""
    if after is not None:
        query = query.where(id_column < after)
    rows = list(session.exec(query.order_by(id_column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
