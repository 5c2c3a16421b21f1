"""Webhook endpoints, the project's default secret, and deliveries."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from api.deps import CurrentPrincipal
from api.routes.images import ERRORS
from shared.core.broker import publish_deliveries
from shared.core.db import session_scope
from shared.webhooks.service import (
    create_endpoint,
    default_secret,
    delete_endpoint,
    delivery_attempts,
    get_endpoint,
    list_deliveries,
    list_endpoints,
    redeliver,
    rotate_secret,
)
from shared.webhooks.views import delivery_view, endpoint_view

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class EndpointCreate(BaseModel):
    url: str = Field(max_length=2000)
    events: list[str] | None = Field(default=None, max_length=100)
    description: str | None = Field(default=None, max_length=500)


@router.post("/endpoints", responses=ERRORS)
async def post_endpoint(body: EndpointCreate, principal: CurrentPrincipal) -> dict[str, Any]:
    def do() -> dict[str, Any]:
        with session_scope() as session:
            endpoint = create_endpoint(session, principal.project_id, body.url, body.events,
                                       body.description)
            return endpoint_view(endpoint, with_secret=True)

    return await run_in_threadpool(do)  # resolves the host: off the event loop


@router.get("/endpoints", responses=ERRORS)
def get_endpoints(principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        return {"object": "list",
                "data": [endpoint_view(e) for e in list_endpoints(session, principal.project_id)]}


@router.get("/endpoints/{endpoint_id}", responses=ERRORS)
def get_one_endpoint(endpoint_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        return endpoint_view(get_endpoint(session, principal.project_id, endpoint_id))


@router.delete("/endpoints/{endpoint_id}", responses=ERRORS)
def remove_endpoint(endpoint_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        endpoint = delete_endpoint(session, principal.project_id, endpoint_id)
    return {"id": endpoint.id, "object": "webhook_endpoint", "deleted": True}


@router.post("/endpoints/{endpoint_id}/rotate_secret", responses=ERRORS)
def post_rotate(endpoint_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        return endpoint_view(rotate_secret(session, principal.project_id, endpoint_id),
                             with_secret=True)


@router.get("/default/secret", responses=ERRORS)
def get_default_secret(principal: CurrentPrincipal) -> dict[str, str]:
    """The secret that signs per-job webhooks (``webhook_url`` on a request)."""
    with session_scope() as session:
        return {"key": default_secret(session, principal.project_id)}


@router.get("/deliveries", responses=ERRORS)
def get_deliveries(
    principal: CurrentPrincipal,
    job_id: Annotated[str | None, Query(max_length=64)] = None,
    endpoint_id: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[str | None, Query(pattern="^(pending|succeeded|failed)$")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    with session_scope() as session:
        rows, has_more = list_deliveries(session, principal.project_id, job_id=job_id,
                                         endpoint_id=endpoint_id, status=status, limit=limit,
                                         after=after)
        data = [delivery_view(d, delivery_attempts(session, d.id)) for d in rows]
    return {"object": "list", "data": data, "has_more": has_more}


@router.post("/deliveries/{delivery_id}/redeliver", responses=ERRORS)
def post_redeliver(delivery_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    with session_scope() as session:
        delivery = redeliver(session, principal.project_id, delivery_id)
        view = delivery_view(delivery, delivery_attempts(session, delivery.id))
    publish_deliveries([delivery_id])
    return view
