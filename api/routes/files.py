"""OpenAI's Files API (``purpose=batch`` inputs, batch outputs)."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api import openapi
from api.deps import (
    After,
    CurrentPrincipal,
    DbSession,
    IdempotencyKeyHeader,
    StorageDep,
    StorageRoom,
)
from api.errors import ERRORS
from api.input_guard import check_text
from shared.core.errors import InvalidRequest, InvalidValue, quoted
from shared.core.schemas import Deleted, ListPage
from shared.files.schemas import FileObject
from shared.files.service import (
    MAX_FILE_BYTES,
    MAX_FILENAME_CHARS,
    UPLOAD_PURPOSES,
    create_file,
    delete_file,
    get_file,
    list_files,
)
from shared.files.views import file_view
from shared.idempotency.service import claim_of, once
from shared.retention.policy import file_expires_after

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileObject, responses=ERRORS, dependencies=[StorageRoom])
async def upload(
    file: Annotated[
        UploadFile, File(description="The file: JSONL for `batch`, an image for `vision`")
    ],
    purpose: Annotated[str, Form(description="`batch`, `vision` or `user_data`")],
    principal: CurrentPrincipal,
    session: DbSession,
    storage: StorageDep,
    request: Request,
    expires_anchor: Annotated[
        str | None,
        Form(alias="expires_after[anchor]", description="`created_at` (OpenAI's only anchor)"),
    ] = None,
    expires_seconds: Annotated[
        str | None,
        Form(
            alias="expires_after[seconds]",
            description="Seconds after the anchor the file expires: 3600 to 2592000",
        ),
    ] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FileObject:
    check_text(purpose, "purpose")
    filename = file.filename or "upload.jsonl"
    check_text(filename, "file")
    if len(filename) > MAX_FILENAME_CHARS:
        raise InvalidValue(
            f"The file name is longer than {MAX_FILENAME_CHARS} characters.", param="file"
        )
    expires_after = file_expires_after(expires_anchor, expires_seconds)
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose '{quoted(purpose)}': use one of {', '.join(UPLOAD_PURPOSES)}.",
            param="purpose",
        )
    # The body was counted as it arrived (api/upload_limit.py) and the part spooled
    # to a temporary file; it is streamed from there to storage, never read whole.
    size = file.size if file.size is not None else 0
    if size > MAX_FILE_BYTES:
        raise InvalidRequest(f"The file is larger than {MAX_FILE_BYTES} bytes.", param="file")
    file.file.seek(0)

    def store() -> FileObject:
        claim = None
        if idempotency_key is not None:
            # "The same request": the same name, purpose and bytes (hashed from the
            # spooled part, in chunks).
            digest = hashlib.sha256()
            while chunk := file.file.read(1 << 20):
                digest.update(chunk)
            file.file.seek(0)
            form = {
                "purpose": purpose,
                "filename": filename,
                "sha256": digest.hexdigest(),
                "expires_after": str(expires_after),
            }
            claim = claim_of(idempotency_key, "POST", request.url.path, form)
        file_id = once(
            session,
            principal.project_id,
            claim,
            "file",
            lambda: (
                create_file(
                    session,
                    storage,
                    principal.project_id,
                    filename,
                    purpose,
                    file.file,
                    size,
                    expires_after,
                ).id
            ),
        )
        return file_view(get_file(session, principal.project_id, file_id))

    return await run_in_threadpool(store)


@router.get("", response_model=ListPage[FileObject], responses=ERRORS)
def read_files(
    principal: CurrentPrincipal,
    session: DbSession,
    purpose: Annotated[
        str | None, Query(max_length=32, description="Only files of this purpose")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10000, description="Objects per page")] = 100,
    after: After = None,
) -> ListPage[FileObject]:
    files, has_more = list_files(
        session, principal.project_id, purpose=purpose, limit=limit, after=after
    )
    return ListPage.of([file_view(f) for f in files], has_more)


@router.get("/{file_id}", response_model=FileObject, responses=ERRORS)
def read_file(file_id: str, principal: CurrentPrincipal, session: DbSession) -> FileObject:
    return file_view(get_file(session, principal.project_id, file_id))


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={**openapi.answer("application/jsonl", "The file's bytes"), **ERRORS},
)
def read_content(
    file_id: str, principal: CurrentPrincipal, session: DbSession, storage: StorageDep
) -> Response:
    file = get_file(session, principal.project_id, file_id)
    return Response(storage.get(file.storage_key), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=Deleted, responses=ERRORS)
def remove_file(
    file_id: str, principal: CurrentPrincipal, session: DbSession, storage: StorageDep
) -> Deleted:
    file = delete_file(session, storage, principal.project_id, file_id, principal.key_id)
    return Deleted(id=file.id, object="file")
