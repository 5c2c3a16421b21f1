"""Files, as OpenAI's Files API: metadata in SQL, bytes in storage."""

from __future__ import annotations

from typing import BinaryIO

import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.audit.service import record
from shared.core.clock import utcnow
from shared.core.errors import InvalidRequest, NotFound
from shared.core.ids import new_id
from shared.core.pages import newest_first, owned
from shared.core.storage import Storage
from shared.files.models import File
from shared.projects.models import Project
from shared.retention.policy import file_expires_at

MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's batch input limit
MAX_FILENAME_CHARS = 500  # the column
# Clients upload "batch" (a batch's input) and "vision"/"user_data" (images a batch
# of edits names by file id); batches write "batch_output".
UPLOAD_PURPOSES = ("batch", "vision", "user_data")
PURPOSES = (*UPLOAD_PURPOSES, "batch_output")


def create_file(
    session: Session,
    storage: Storage,
    project_id: str,
    filename: str,
    purpose: str,
    data: bytes | BinaryIO,
    size: int | None = None,
    expires_after: int | None = None,
) -> File:
    """Store a file (bytes, or an open file streamed to storage in chunks: an
    upload is never held in memory whole) and record it. It expires
    ``expires_after`` seconds from now (OpenAI's ``expires_after``), or at its
    project's file retention, whichever comes first (never, without either)."""
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose '{purpose}': use one of {', '.join(UPLOAD_PURPOSES)}.",
            param="purpose",
        )
    size = len(data) if isinstance(data, bytes) else size
    assert size is not None
    if size > MAX_FILE_BYTES:
        raise InvalidRequest(
            f"The file is {size} bytes; the limit is {MAX_FILE_BYTES}.", param="file"
        )
    file_id = new_id("file")
    key = f"{project_id}/files/{file_id}"
    if isinstance(data, bytes):
        storage.put(key, data, "application/jsonl")
    else:
        storage.put_file(key, data, "application/jsonl")
    project = session.get(Project, project_id)
    now = utcnow()
    file = File(
        id=file_id,
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        storage_key=key,
        created_at=now,
        expires_at=file_expires_at(
            now, expires_after, project.file_retention_seconds if project else None
        ),
    )
    session.add(file)
    session.flush()
    return file


def get_file(session: Session, project_id: str, file_id: str) -> File:
    """The file; an expired one is gone (404) even before the purge deletes it."""
    missing = NotFound(f"No such File object: {file_id}", param="file_id")
    file = owned(session, File, project_id, file_id, missing)
    if file.expires_at is not None and file.expires_at <= utcnow():
        raise missing
    return file


def list_files(
    session: Session, project_id: str, *, purpose: str | None, limit: int, after: str | None
) -> tuple[list[File], bool]:
    query = select(File).where(
        col(File.project_id) == project_id,
        col(File.deleted_at).is_(None),
        sa.or_(col(File.expires_at).is_(None), col(File.expires_at) > utcnow()),
    )
    if purpose is not None:
        query = query.where(col(File.purpose) == purpose)
    return newest_first(session, query, col(File.id), limit=limit, after=after)


def delete_file(
    session: Session, storage: Storage, project_id: str, file_id: str, actor: str
) -> File:
    """Delete the file: its row marked a tombstone, its object deleted at once (as a
    deleted job's images are; a storage outage is a 503 and rolls the mark back),
    the deletion audited (``file.delete``). Of two deletes at once, the one that
    marks it second answers 404."""
    file = get_file(session, project_id, file_id)
    marked = session.execute(
        sa.update(File)
        .where(col(File.id) == file.id, col(File.deleted_at).is_(None))
        .values(deleted_at=utcnow())
    )
    if marked.rowcount != 1:  # type: ignore[attr-defined]
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    storage.delete([file.storage_key])
    record(
        session,
        actor,
        "file.delete",
        file.id,
        {"filename": file.filename, "purpose": file.purpose, "bytes": file.bytes},
        project_id=project_id,
    )
    return file
