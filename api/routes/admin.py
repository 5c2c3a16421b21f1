"""Projects and keys over HTTP, for the admin key (``IMAGEGEN_ADMIN_API_KEY``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.deps import DbSession, require_admin
from api.errors import ERRORS
from shared.core.schemas import ListPage
from shared.projects.models import Project
from shared.projects.schemas import (
    CreatedKey,
    KeyCreate,
    KeyObject,
    Limits,
    ProjectCreate,
    ProjectObject,
)
from shared.projects.service import (
    create_key,
    create_project,
    list_keys,
    list_projects,
    revoke_key,
    update_limits,
)
from shared.projects.views import key_view, project_view

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.get("/projects", response_model=ListPage[ProjectObject], responses=ERRORS)
def get_projects(session: DbSession) -> ListPage[ProjectObject]:
    return ListPage.of([project_view(p) for p in list_projects(session)])


@router.post("/projects", response_model=ProjectObject, responses=ERRORS)
def post_project(body: ProjectCreate, session: DbSession) -> ProjectObject:
    return project_view(create_project(session, body.name, **body.model_dump(exclude={"name"})))


@router.patch("/projects/{name:path}", response_model=ProjectObject, responses=ERRORS)
def patch_project(name: str, body: Limits, session: DbSession) -> ProjectObject:
    return project_view(update_limits(session, name, **body.model_dump(exclude_unset=True)))


@router.get("/keys", response_model=ListPage[KeyObject], responses=ERRORS)
def get_keys(
    session: DbSession,
    project: Annotated[
        str | None, Query(max_length=200, description="Only this project's keys")
    ] = None,
) -> ListPage[KeyObject]:
    return ListPage.of([key_view(k, p) for k, p in list_keys(session, project)])


@router.post("/keys", response_model=CreatedKey, responses=ERRORS)
def post_key(body: KeyCreate, session: DbSession) -> CreatedKey:
    """Create a key; ``key`` appears in this answer only."""
    key, plaintext = create_key(session, body.project, body.name, body.user)
    project = session.get(Project, key.project_id)
    assert project is not None
    return CreatedKey(**key_view(key, project).model_dump(), key=plaintext)


@router.post("/keys/{key_id}/revoke", response_model=KeyObject, responses=ERRORS)
def post_revoke(key_id: str, session: DbSession) -> KeyObject:
    key = revoke_key(session, key_id)
    project = session.get(Project, key.project_id)
    assert project is not None
    return key_view(key, project)
