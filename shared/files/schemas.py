"""Wire shapes of OpenAI's Files API."""

from __future__ import annotations

from typing import Literal

from shared.core.schemas import Schema


class FileObject(Schema):
    """OpenAI's File object."""

    id: str
    """The file's id (``file_...``)."""
    object: Literal["file"] = "file"
    """Always ``file``."""
    bytes: int
    """Its size in bytes."""
    created_at: int
    """Unix seconds."""
    filename: str
    """The name it was uploaded with (or the output file's name)."""
    purpose: str
    """``batch``, ``batch_output``, ``vision`` or ``user_data``."""
    status: Literal["processed"] = "processed"
    """Always ``processed`` (deprecated by OpenAI, kept for its clients)."""
    expires_at: int | None = None
    """When the file expires and is deleted, Unix seconds (its ``expires_after``, or
    its project's file retention); null: kept until deleted."""
    status_details: str | None = None
    """Never set here (deprecated by OpenAI)."""
