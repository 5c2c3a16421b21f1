"""Local-storage files, served only with a valid, unexpired HMAC signature."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api import openapi
from api.deps import DbSession, StorageDep
from api.errors import ERRORS
from shared.core.errors import Gone, NotFound
from shared.core.storage import LocalStorage
from shared.imaging import CONTENT_TYPES
from shared.retention.service import image_expired

router = APIRouter(tags=["files"])


@router.get(
    "/v1/images/files/{key:path}",
    response_class=Response,
    responses={
        **openapi.answer("image/png", "The image (png, jpeg or webp)", binary=True),
        **ERRORS,
    },
)
def read_file(
    key: str,
    storage: StorageDep,
    session: DbSession,
    expires: Annotated[int, Query(description="When the URL stops working, Unix seconds")],
    signature: Annotated[str, Query(max_length=128, description="The URL's HMAC signature")],
) -> Response:
    if not isinstance(storage, LocalStorage):
        raise NotFound("No such file.")
    # An image past its life answers 410 image_expired, even before the purge has
    # deleted its file (a deleted job's: 404, its file gone). Looked at before the
    # URL's own expiry, which is capped at the image's life: a genuine URL of an
    # expired image would otherwise always say 403 "URL expired".
    if storage.signed(key, expires, signature) and image_expired(session, key):
        raise Gone("This image has expired and was deleted.")
    storage.verify(key, expires, signature)
    data = storage.get(key)
    ext = key.rsplit(".", 1)[-1]
    return Response(
        data,
        media_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
        headers={"Cache-Control": "private, max-age=3600"},
    )
