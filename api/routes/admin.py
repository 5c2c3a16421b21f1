"""Projects and keys over HTTP, for the admin key (``IMAGEGEN_ADMIN_API_KEY``)."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from api.deps import key_from_request
from api.routes.images import ERRORS
from shared.core.db import session_scope
from shared.core.errors import AuthenticationError, NotFound
from shared.core.settings import get_settings
from shared.projects.models import Project
from shared.projects.service import (
    create_key,
    create_project,
    list_keys,
    list_projects,
    revoke_key,
    update_limits,
)
from shared.projects.views import key_view, project_view


def require_admin(request: Request) -> None:
    admin = get_settings().admin_api_key
    if not admin:
        raise NotFound("The admin API is not enabled.")
    key = key_from_request(request) or ""
    if not hmac.compare_digest(key.encode(), admin.encode()):
        raise AuthenticationError("This endpoint needs the admin API key.")


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


INT32_MAX = 2**31 - 1  # the limit columns are SQL INTEGER


class Limits(BaseModel):
    key_requests_per_minute: int | None = Field(default=None, ge=0, le=INT32_MAX)
    images_per_day: int | None = Field(default=None, ge=0, le=INT32_MAX)
    jobs_in_flight: int | None = Field(default=None, ge=0, le=INT32_MAX)


class ProjectCreate(Limits):
    name: str = Field(min_length=1, max_length=200)


class KeyCreate(BaseModel):
    project: str = Field(min_length=1, max_length=200)
    name: str = Field(default="default", max_length=200)
    user: str = Field(default="", max_length=200)


@router.get("/projects", responses=ERRORS)
def get_projects() -> dict[str, Any]:
    with session_scope() as session:
        return {"object": "list", "data": [project_view(p) for p in list_projects(session)]}


@router.post("/projects", responses=ERRORS)
def post_project(body: ProjectCreate) -> dict[str, Any]:
    with session_scope() as session:
        return project_view(create_project(session, body.name, **body.model_dump(
            exclude={"name"})))


@router.patch("/projects/{name:path}", responses=ERRORS)
def patch_project(name: str, body: Limits) -> dict[str, Any]:
    with session_scope() as session:
        return project_view(update_limits(session, name, **body.model_dump(exclude_unset=True)))


@router.get("/keys", responses=ERRORS)
def get_keys(project: Annotated[str | None, Query(max_length=200)] = None) -> dict[str, Any]:
    with session_scope() as session:
        return {"object": "list", "data": [key_view(k, p) for k, p in list_keys(session, project)]}


@router.post("/keys", responses=ERRORS)
def post_key(body: KeyCreate) -> dict[str, Any]:
    """Create a key; ``key`` appears in this answer only."""
    with session_scope() as session:
        key, plaintext = create_key(session, body.project, body.name, body.user)
        project = session.get(Project, key.project_id)
        assert project is not None
        return {**key_view(key, project), "key": plaintext}


@router.post("/keys/{key_id}/revoke", responses=ERRORS)
def post_revoke(key_id: str) -> dict[str, Any]:
    with session_scope() as session:
        key = revoke_key(session, key_id)
        project = session.get(Project, key.project_id)
        assert project is not None
        return key_view(key, project)
