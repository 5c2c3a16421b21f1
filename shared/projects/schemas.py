"""Wire shapes of the admin API: projects, their limits, and keys."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

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


class ProjectObject(BaseModel):
    id: str
    object: Literal["project"] = "project"
    name: str
    created_at: int
    key_requests_per_minute: int | None = None
    images_per_day: int | None = None
    jobs_in_flight: int | None = None


class KeyObject(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    user: str
    prefix: str
    project: str
    created_at: int
    last_used_at: int | None = None
    revoked_at: int | None = None


class CreatedKey(KeyObject):
    """A new key: ``key`` appears in this answer only; only its hash is stored."""

    key: str
