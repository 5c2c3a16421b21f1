"""Webhook endpoints, the project's default secret, and deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from api.deps import After, CurrentPrincipal, DbSession
from api.errors import ERRORS
from shared.core.schemas import Deleted, ListPage
from shared.webhooks.models import DeliveryStatus
from shared.webhooks.schemas import (
    DefaultSecret,
    DeliveryObject,
    EndpointCreate,
    EndpointObject,
    EndpointWithSecret,
)
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
from shared.webhooks.views import delivery_view, endpoint_view, endpoint_with_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("/endpoints", response_model=EndpointWithSecret, responses=ERRORS)
async def post_endpoint(
    body: EndpointCreate, principal: CurrentPrincipal, session: DbSession
) -> EndpointWithSecret:
    def create() -> EndpointWithSecret:  # resolves the host: off the event loop
        return endpoint_with_secret(
            create_endpoint(session, principal.project_id, body.url, body.events, body.description)
        )

    return await run_in_threadpool(create)


@router.get("/endpoints", response_model=ListPage[EndpointObject], responses=ERRORS)
def get_endpoints(principal: CurrentPrincipal, session: DbSession) -> ListPage[EndpointObject]:
    return ListPage.of([endpoint_view(e) for e in list_endpoints(session, principal.project_id)])


@router.get("/endpoints/{endpoint_id}", response_model=EndpointObject, responses=ERRORS)
def get_one_endpoint(
    endpoint_id: str, principal: CurrentPrincipal, session: DbSession
) -> EndpointObject:
    return endpoint_view(get_endpoint(session, principal.project_id, endpoint_id))


@router.delete("/endpoints/{endpoint_id}", response_model=Deleted, responses=ERRORS)
def remove_endpoint(endpoint_id: str, principal: CurrentPrincipal, session: DbSession) -> Deleted:
    endpoint = delete_endpoint(session, principal.project_id, endpoint_id)
    return Deleted(id=endpoint.id, object="webhook_endpoint")


@router.post(
    "/endpoints/{endpoint_id}/rotate_secret", response_model=EndpointWithSecret, responses=ERRORS
)
def post_rotate(
    endpoint_id: str, principal: CurrentPrincipal, session: DbSession
) -> EndpointWithSecret:
    return endpoint_with_secret(rotate_secret(session, principal.project_id, endpoint_id))


@router.get("/default/secret", response_model=DefaultSecret, responses=ERRORS)
def get_default_secret(principal: CurrentPrincipal, session: DbSession) -> DefaultSecret:
    """The secret that signs per-job webhooks (``webhook_url`` on a request)."""
    return DefaultSecret(key=default_secret(session, principal.project_id))


@router.get("/deliveries", response_model=ListPage[DeliveryObject], responses=ERRORS)
def get_deliveries(
    principal: CurrentPrincipal,
    session: DbSession,
    job_id: Annotated[
        str | None, Query(max_length=64, description="Only this job's deliveries")
    ] = None,
    endpoint_id: Annotated[
        str | None, Query(max_length=64, description="Only this endpoint's")
    ] = None,
    status: Annotated[
        DeliveryStatus | None, Query(description="Only deliveries in this status")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Objects per page")] = 20,
    after: After = None,
) -> ListPage[DeliveryObject]:
    rows, has_more = list_deliveries(
        session,
        principal.project_id,
        job_id=job_id,
        endpoint_id=endpoint_id,
        status=status,
        limit=limit,
        after=after,
    )
    return ListPage.of([delivery_view(d, delivery_attempts(session, d.id)) for d in rows], has_more)


@router.post("/deliveries/{delivery_id}/redeliver", response_model=DeliveryObject, responses=ERRORS)
def post_redeliver(
    delivery_id: str, principal: CurrentPrincipal, session: DbSession
) -> DeliveryObject:
    delivery = redeliver(session, principal.project_id, delivery_id)
    return delivery_view(delivery, delivery_attempts(session, delivery.id))
