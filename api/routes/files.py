"""OpenAI's Files API (``purpose=batch`` inputs, batch outputs)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.deps import CurrentPrincipal, StorageDep
from api.input_guard import check_text
from api.routes.images import ERRORS
from shared.core.db import session_scope
from shared.core.errors import InvalidRequest, InvalidValue
from shared.files.service import (
    MAX_FILE_BYTES,
    MAX_FILENAME_CHARS,
    create_file,
    delete_file,
    get_file,
    list_files,
)
from shared.files.views import file_view

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", responses=ERRORS)
async def upload(file: UploadFile, purpose: Annotated[str, Form()], principal: CurrentPrincipal,
                 storage: StorageDep) -> dict[str, Any]:
    check_text(purpose, "purpose")
    filename = file.filename or "upload.jsonl"
    check_text(filename, "file")
    if len(filename) > MAX_FILENAME_CHARS:
        raise InvalidValue(f"The file name is longer than {MAX_FILENAME_CHARS} characters.",
                           param="file")
    if purpose != "batch":
        raise InvalidRequest(f"Invalid purpose '{purpose}': only 'batch' is supported.",
                             param="purpose")
    # The body was counted as it arrived (api/upload_limit.py) and the part spooled
    # to a temporary file; it is streamed from there to storage, never read whole.
    size = file.size if file.size is not None else 0
    if size > MAX_FILE_BYTES:
        raise InvalidRequest(f"The file is larger than {MAX_FILE_BYTES} bytes.", param="file")
    file.file.seek(0)

    def store() -> dict[str, Any]:
        with session_scope() as session:
            return file_view(create_file(session, storage, principal.project_id,
                                         filename, purpose, file.file, size))

    return await run_in_threadpool(store)


@router.get("", responses=ERRORS)
def read_files(principal: CurrentPrincipal,
               purpose: Annotated[str | None, Query(max_length=32)] = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 100,
               after: Annotated[str | None, Query(max_length=64)] = None) -> dict[str, Any]:
    with session_scope() as session:
        files, has_more = list_files(session, principal.project_id, purpose=purpose,
                                     limit=limit, after=after)
        data = [file_view(f) for f in files]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/{file_id}", responses=ERRORS)
def read_file(file_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        return file_view(get_file(session, principal.project_id, file_id))


@router.get("/{file_id}/content", responses={200: {"content": {"application/jsonl": {}}},
                                            **ERRORS})
def read_content(file_id: str, principal: CurrentPrincipal, storage: StorageDep) -> Response:
    with session_scope() as session:
        file = get_file(session, principal.project_id, file_id)
    return Response(storage.get(file.storage_key), media_type="application/jsonl")


@router.delete("/{file_id}", responses=ERRORS)
def remove_file(file_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        file = delete_file(session, principal.project_id, file_id)
    return {"id": file.id, "object": "file", "deleted": True}
