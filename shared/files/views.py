"""Rendering files as OpenAI's File object."""

from __future__ import annotations

from shared.core.clock import to_unix
from shared.files.models import File
from shared.files.schemas import FileObject


def file_view(file: File) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=to_unix(file.created_at) or 0,
        filename=file.filename,
        purpose=file.purpose,
        expires_at=to_unix(file.expires_at),
    )
