"""Projects and keys over HTTP, for the admin key (``IMAGEGEN_ADMIN_API_KEY``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from api.deps import After, DbSession, context_of, require_admin
from api.errors import ERRORS
from shared.audit.schemas import AuditEventObject
from shared.audit.service import ADMIN, list_events, project_names
from shared.audit.views import event_view
from shared.core.schemas import ListPage
from shared.jobs.routing import Cooldowns
from shared.projects.models import Project
from shared.projects.schemas import (
    CreatedKey,
    DeploymentHealth,
    KeyCreate,
    KeyObject,
    ProjectCreate,
    ProjectObject,
    ProjectUpdate,
)
from shared.projects.service import (
    create_key,
    create_project,
    get_project,
    list_keys,
    list_projects,
    revoke_key,
    update_limits,
)
from shared.projects.views import key_view, project_view
from shared.registry import UpstreamModel, get_registry
from shared.retention.service import RETENTIONS, set_retention

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.get("/projects", response_model=ListPage[ProjectObject], responses=ERRORS)
def get_projects(session: DbSession) -> ListPage[ProjectObject]:
    return ListPage.of([project_view(p) for p in list_projects(session)])


@router.post("/projects", response_model=ProjectObject, responses=ERRORS)
def post_project(body: ProjectCreate, session: DbSession) -> ProjectObject:
    limits = body.model_dump(exclude={"name"})
    return project_view(create_project(session, body.name, actor=ADMIN, **limits))


@router.patch("/projects/{name:path}", response_model=ProjectObject, responses=ERRORS)
def patch_project(name: str, body: ProjectUpdate, session: DbSession) -> ProjectObject:
    changes = body.model_dump(exclude_unset=True)
    retention = {f: changes.pop(f) for f in RETENTIONS if f in changes}
    if retention:
        project = set_retention(session, name, ADMIN, **retention)
    if changes or not retention:
        project = update_limits(session, name, actor=ADMIN, **changes)
    return project_view(project)


@router.get("/deployments", response_model=ListPage[DeploymentHealth], responses=ERRORS)
def get_deployments(request: Request) -> ListPage[DeploymentHealth]:
    """Every deployment of every upstream model, and whether it is cooling down
    (as every worker sees it, through Redis)."""
    cooldowns = Cooldowns(context_of(request).redis)
    return ListPage.of(
        [
            DeploymentHealth(
                model=spec.name,
                deployment=deployment.id,
                weight=deployment.weight,
                images_per_minute=deployment.images_per_minute,
                max_concurrency=deployment.max_concurrency,
                cooling=bool(spec.deployments) and cooldowns.cooling(spec.name, deployment.id),
            )
            for spec in get_registry().models
            if isinstance(spec, UpstreamModel)
            for deployment in spec.upstreams()
        ]
    )


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
    key, plaintext = create_key(
        session,
        body.project,
        body.name,
        body.user,
        daily_budget_usd=body.daily_budget_usd,
        monthly_budget_usd=body.monthly_budget_usd,
        actor=ADMIN,
    )
    project = session.get(Project, key.project_id)
    assert project is not None
    return CreatedKey(**key_view(key, project).model_dump(), key=plaintext)


@router.post("/keys/{key_id}/revoke", response_model=KeyObject, responses=ERRORS)
def post_revoke(key_id: str, session: DbSession) -> KeyObject:
    key = revoke_key(session, key_id, actor=ADMIN)
    project = session.get(Project, key.project_id)
    assert project is not None
    return key_view(key, project)


@router.get("/audit", response_model=ListPage[AuditEventObject], responses=ERRORS)
def get_audit(
    session: DbSession,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Objects per page")] = 20,
    project: Annotated[
        str | None, Query(max_length=200, description="Only this project's events (its name)")
    ] = None,
    action: Annotated[
        str | None, Query(max_length=64, description="Only this action (`key.revoke`)")
    ] = None,
    since: Annotated[
        int | None, Query(ge=0, le=253402300799, description="Only events at or after, Unix s")
    ] = None,
) -> ListPage[AuditEventObject]:
    """The audit trail: every admin action, newest first."""
    project_id = get_project(session, project).id if project is not None else None
    events, more = list_events(
        session,
        limit=limit,
        after=after,
        project_id=project_id,
        action=action,
        since=datetime.fromtimestamp(since, UTC) if since is not None else None,
    )
    names = project_names(session, events)
    return ListPage.of([event_view(e, names) for e in events], has_more=more)
