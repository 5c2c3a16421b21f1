"""Wire shapes every domain shares: the list page and the deleted-object answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    """OpenAI's list envelope: ``data`` newest first, with cursors for ``after``."""

    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, data: Sequence[T], has_more: bool = False) -> ListPage[T]:
        ids = [getattr(item, "id", None) for item in data]
        return cls(
            data=list(data),
            has_more=has_more,
            first_id=ids[0] if ids else None,
            last_id=ids[-1] if ids else None,
        )


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True
