"""The registry's wire shapes: ``GET /v1/models`` and ``GET /v1/models/{id}``."""

from __future__ import annotations

from typing import Literal

from shared.core.schemas import Schema


class ModelObject(Schema):
    """OpenAI's Model object: an entry of the model registry."""

    id: str
    """The model's name, as requests give it."""
    object: Literal["model"] = "model"
    """Always ``model``."""
    created: int
    """Unix seconds (registry entries have no date of their own: 2025-01-01)."""
    owned_by: str
    """Who makes it (the registry's ``owned_by``)."""


class ModelList(Schema):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    """Always ``list``."""
    data: list[ModelObject]
    """Every model this service serves."""
