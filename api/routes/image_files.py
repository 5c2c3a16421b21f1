"""Local-storage files, served only with a valid, unexpired HMAC signature."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api.deps import StorageDep
from api.routes.images import ERRORS
from shared.core.errors import NotFound
from shared.core.storage import LocalStorage
from shared.imaging import CONTENT_TYPES

router = APIRouter(tags=["files"])


@router.get(
    "/v1/images/files/{key:path}", responses={200: {"content": {"image/png": {}}}, **ERRORS}
)
def read_file(
    key: str,
    storage: StorageDep,
    expires: Annotated[int, Query()],
    signature: Annotated[str, Query(max_length=128)],
) -> Response:
    if not isinstance(storage, LocalStorage):
        raise NotFound("No such file.")
    storage.verify(key, expires, signature)
    data = storage.get(key)
    ext = key.rsplit(".", 1)[-1]
    return Response(
        data,
        media_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
        headers={"Cache-Control": "private, max-age=3600"},
    )
