"""``GET /v1/models`` and ``GET /v1/models/{id}`` in OpenAI's list shape."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentPrincipal
from api.errors import ERRORS
from shared.registry import get_registry
from shared.registry.schemas import ModelList, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])
_CREATED = 1735689600  # 2025-01-01: registry entries have no creation time of their own


@router.get("", response_model=ModelList, responses=ERRORS)
def list_models(_: CurrentPrincipal) -> ModelList:
    return ModelList(
        data=[
            ModelObject(id=m.name, created=_CREATED, owned_by=m.owned_by)
            for m in get_registry().models
        ]
    )


@router.get("/{model_id:path}", response_model=ModelObject, responses=ERRORS)
def read_model(model_id: str, _: CurrentPrincipal) -> ModelObject:
    spec = get_registry().get(model_id)
    return ModelObject(id=spec.name, created=_CREATED, owned_by=spec.owned_by)
