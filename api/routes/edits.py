"""``POST /v1/images/edits`` and ``POST /v1/images/variations``: OpenAI's multipart
forms. The uploads are checked (format, size, the mask's alpha and size), stored
under the job they belong to and referenced from it (``request.images``,
``request.mask``); the job then runs, waits, streams (``image_edit.*`` events) and
answers as a generation does."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from api import openapi
from api.deps import CurrentPrincipal, StorageRoom
from api.generation import webhook_for
from api.input_guard import check_text
from api.routes.images import Answering, HowToAnswer, answer
from shared.core.errors import InvalidRequest
from shared.core.ids import new_id
from shared.core.settings import Settings
from shared.imaging import check_mask, check_total_pixels, read_input, too_many_bytes
from shared.jobs.input import form_request, parse_request, validate_edit
from shared.jobs.schemas import ImageEditForm, ImagesResponse, ImageVariationForm
from shared.jobs.service import store_inputs
from shared.projects.service import Principal
from shared.registry import get_registry

router = APIRouter(tags=["images"])
IMAGE_FIELDS = ("image", "image[]")


def _route(operation: Literal["edit", "variation"]) -> Callable[..., Awaitable[Any]]:
    """The handler of one form (edits and variations differ only in what they take)."""

    async def handler(
        request: Request, principal: CurrentPrincipal, how: HowToAnswer
    ) -> Response | ImagesResponse:
        return await _accept(request, operation, principal, how)

    return handler


def _form(schema: type[BaseModel]) -> dict[str, Any]:
    """The multipart body in the OpenAPI document (the handler reads the form itself:
    ``image[]`` repeats, and uploads are checked before anything is parsed)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema.model_json_schema()}},
        }
    }


for _operation, _summary, _schema in (
    ("edit", "Create image edit", ImageEditForm),
    ("variation", "Create image variation", ImageVariationForm),
):
    router.post(
        f"/v1/images/{_operation}s",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=openapi.IMAGE_ANSWERS,
        summary=_summary,
        name=f"create_image_{_operation}",
        openapi_extra=_form(_schema),
        # Before the form is read: a project at its quota stores no uploads.
        dependencies=[StorageRoom],
    )(_route(_operation))  # type: ignore[arg-type]


async def _accept(
    request: Request,
    operation: Literal["edit", "variation"],
    principal: Principal,
    how: Answering,
) -> Response | ImagesResponse:
    settings = how.settings
    form = await request.form(max_files=settings.edit_max_images + 1, max_fields=200)
    try:
        fields: dict[str, list[str]] = {}
        uploads: list[UploadFile] = []
        mask_upload: UploadFile | None = None
        for name, value in form.multi_items():
            if isinstance(value, str):
                check_text(value, name)  # a NUL in `prompt=a\0b` was taken
                fields.setdefault(name, []).append(value)
            elif name in IMAGE_FIELDS:
                uploads.append(value)
            elif name == "mask" and operation == "edit":
                mask_upload = value
            else:
                raise InvalidRequest(f"Unexpected file field '{name}'.", param=name)
        _check_counts(operation, uploads, settings)
        limit = settings.edit_max_image_bytes
        blobs = [await _read_capped(upload, "image", limit) for upload in uploads]
        mask_blob = None
        if mask_upload is not None:
            mask_blob = await _read_capped(mask_upload, "mask", limit)
    finally:
        await form.close()
    limits = (limit, settings.edit_max_image_pixels)
    images = await run_in_threadpool(lambda: [read_input(b, "image", *limits) for b in blobs])
    check_total_pixels(images, settings.edit_max_total_pixels)
    mask = None
    if mask_blob is not None:
        mask = await run_in_threadpool(read_input, mask_blob, "mask", *limits)
        check_mask(mask, images[0])
    body = form_request(fields)
    params = validate_edit(dict(body), get_registry(), operation)
    digests = {
        "images": [hashlib.sha256(i.data).hexdigest() for i in images],
        "mask": hashlib.sha256(mask.data).hexdigest() if mask else None,
    }
    claim = how.claims({**body, **digests})
    webhook = await webhook_for(parse_request({**body, "prompt": params.prompt}))
    job_id = new_id("job")
    keys, mask_key = await run_in_threadpool(
        store_inputs, how.links.storage, principal.project_id, job_id, images, mask
    )
    params = params.model_copy(update={"images": keys, "mask": mask_key})
    return await answer(
        request,
        principal,
        params,
        webhook,
        claim,
        how,
        job_id=job_id,
        prefix="image_edit",
        input_bytes=sum(len(i.data) for i in images) + (len(mask.data) if mask else 0),
    )


def _check_counts(operation: str, uploads: list[UploadFile], settings: Settings) -> None:
    if not uploads:
        raise InvalidRequest(
            "An 'image' file is required.", param="image", code="missing_required_parameter"
        )
    most = 1 if operation == "variation" else settings.edit_max_images
    if len(uploads) > most:
        raise InvalidRequest(
            f"At most {most} image{'s' if most > 1 else ''} per {operation}; got {len(uploads)}.",
            param="image",
            code="invalid_value",
        )


async def _read_capped(upload: UploadFile, param: str, limit: int) -> bytes:
    """An upload's bytes, refused before they are read when over the limit: the form
    parser has spooled a large one to disk, and reading it whole first cost the
    API its size in memory (400 MiB for a 400 MiB image)."""
    if upload.size is not None and upload.size > limit:
        raise too_many_bytes(param, upload.size, limit)
    return await upload.read(limit + 1)  # one byte over, and read_input refuses it
