"""Wire shapes every domain shares: the list page and the deleted-object answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Schema(BaseModel):
    """The base of every wire shape. The docstring under a field is its description
    in the OpenAPI document (``/docs``), so the reader of the code and the reader of
    the API see the same words; ``tests/service/test_house.py`` checks that every
    field has one."""

    model_config = ConfigDict(use_attribute_docstrings=True)


class ListPage(Schema, Generic[T]):
    """OpenAI's list envelope: ``data`` newest first, with cursors for ``after``."""

    object: Literal["list"] = "list"
    """Always ``list``."""
    data: list[T]
    """This page's objects, newest first."""
    first_id: str | None = None
    """The id of the first object on this page."""
    last_id: str | None = None
    """The id of the last object on this page: pass it as ``after`` for the next page."""
    has_more: bool = False
    """Whether more objects follow this page."""

    @classmethod
    def of(cls, data: Sequence[T], has_more: bool = False) -> ListPage[T]:
        ids = [getattr(item, "id", None) for item in data]
        return cls(
            data=list(data),
            has_more=has_more,
            first_id=ids[0] if ids else None,
            last_id=ids[-1] if ids else None,
        )


class Deleted(Schema):
    """The answer to a delete."""

    id: str
    """The deleted object's id."""
    object: str
    """The deleted object's type (``file``, ``webhook_endpoint``)."""
    deleted: Literal[True] = True
    """Always true."""
