"""Request dependencies: the request's transaction, authentication, settings, storage.

Authentication runs in a short transaction of its own (the key lookup and its
``last_used_at``), when the key is not cached: a request that then waits for a job
must not hold a database connection while it waits."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from sqlmodel import Session

from shared.core.clock import utcnow
from shared.core.context import Context
from shared.core.db import unit_of_work
from shared.core.errors import AuthenticationError, NotFound
from shared.core.settings import Settings, get_settings
from shared.core.storage import Storage
from shared.idempotency.service import Claim, claim_of
from shared.projects.limits import get_limiter
from shared.projects.service import (
    KNOWN_KEYS,
    KnownKey,
    Principal,
    authenticate,
    hash_key,
    touch_due,
    touch_key,
)
from shared.quota import STORED, refuse_if_full

# auto_error=False: we answer a missing key ourselves, in the surface's error shape.
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
basic = HTTPBasic(auto_error=False, description="HTTP Basic: user 'api', password = api key")


# Gateway SDKs send the real key in their own header beside an Authorization
# header their vendored OpenAI client fills with a placeholder
# ("Bearer OPENAI_API_KEY"): where one is present, it is the key.
GATEWAY_KEY_HEADERS = ("x-obiguard-api-key", "x-portkey-api-key")


def missing_key() -> AuthenticationError:
    return AuthenticationError(
        "You didn't provide an API key. Provide it as 'Authorization: Bearer YOUR_KEY'.",
        code="missing_api_key",
    )


def key_from_request(request: Request) -> str | None:
    """The API key from a gateway's header, Bearer, HTTP Basic (password) or x-api-key."""
    for header in GATEWAY_KEY_HEADERS:
        if request.headers.get(header, "").strip():
            return request.headers[header].strip()
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            _user, _, password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return request.headers.get("x-api-key", "").strip() or None


async def current_principal(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller, from the key. Async, and on a cached key no database and no thread
    hop: only the rate limit's round trip to Redis, on the loop."""
    key = key_from_request(request)
    if not key:
        raise missing_key()
    known, fresh = await known_key(key)
    if known is None:
        raise wrong_key(key)
    if not fresh and touch_due(known.used_at, now := utcnow()):
        known.used_at = now
        await run_in_threadpool(_touch, known.principal.key_id, now)
    await get_limiter().check_request(known.principal)
    return known.principal


def wrong_key(key: str) -> AuthenticationError:
    return AuthenticationError(f"Incorrect API key provided: {key[:6]}***.")


async def known_key(key: str) -> tuple[KnownKey | None, bool]:
    """The key's cached principal, or looked up (and cached) when it is not cached;
    None for a key that is not valid. The flag says it was just looked up, its
    ``last_used_at`` written by the lookup."""
    digest = hash_key(key)
    known, generation = KNOWN_KEYS.cached(digest)
    if known is not None:
        return known, False
    known = await run_in_threadpool(_authenticate, key)
    if known is not None:
        KNOWN_KEYS.store(digest, known, generation)
    return known, True


def require_admin(request: Request) -> None:
    """The admin API's check: the key is ``IMAGEGEN_ADMIN_API_KEY``."""
    admin = get_settings().admin_api_key
    if not admin:
        raise NotFound("The admin API is not enabled.")
    key = key_from_request(request) or ""
    if not hmac.compare_digest(key.encode(), admin.encode()):
        raise AuthenticationError("This endpoint needs the admin API key.")


def _authenticate(key: str) -> KnownKey | None:
    with unit_of_work() as session:
        return authenticate(session, key)


def _touch(key_id: str, now: datetime) -> None:
    with unit_of_work() as session:
        touch_key(session, key_id, now)


async def weave_principal(
    request: Request,
    _basic: Annotated[HTTPBasicCredentials | None, Depends(basic)],
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The same keys, declared for the Weave surface as HTTP Basic or Bearer."""
    return await current_principal(request, _bearer)


def request_session() -> Iterator[Session]:
    """The request's unit of work: committed when the route returns, before the
    answer is sent (``scope="function"``), so a client never reads an answer
    about a row that is not there; rolled back if the route raised."""
    with unit_of_work() as session:
        yield session


# The plain dependencies are async on purpose: FastAPI runs a sync dependency in
# its thread pool, one hop per dependency per request (measured: 6% of the API's
# CPU on the sync generation path, for three functions that only read a cache).
async def base_url(request: Request) -> str:
    return get_settings().public_url or str(request.base_url)


async def settings_dep(request: Request) -> Settings:
    return context_of(request).settings


async def storage_dep(request: Request) -> Storage:
    return context_of(request).storage


@dataclass(frozen=True)
class ImageLinks:
    """How a route links the images it shows: through the storage (presigned or
    signed URLs), under the base URL the client asked on, for this long."""

    storage: Storage
    base_url: str
    expiry: int


async def image_links(request: Request, base: Annotated[str, Depends(base_url)]) -> ImageLinks:
    made = context_of(request)
    return ImageLinks(made.storage, base, made.settings.url_expiry_seconds)


def context_of(request: Request) -> Context:
    """The context the app's lifespan made (shared/core/context.py)."""
    made: Context = request.app.state.context
    return made


DbSession = Annotated[Session, Depends(request_session, scope="function")]
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
WeavePrincipal = Annotated[Principal, Depends(weave_principal)]


async def room_for(principal: Principal) -> None:
    """Refuse new work (429 ``storage_quota_exceeded``) once the project stores as
    many bytes as its quota allows (shared/quota.py). Without a quota: nothing, not
    even a thread hop; with one, a fresh cached figure is read on the loop."""
    quota = principal.storage_quota_bytes
    if quota is None:
        return
    stored = STORED.cached(principal.project_id)
    if stored is None:
        stored = await run_in_threadpool(STORED.get, principal.project_id, unit_of_work)
    refuse_if_full(principal.project_id, stored, quota)


async def storage_room(principal: CurrentPrincipal) -> None:
    await room_for(principal)


async def weave_storage_room(principal: WeavePrincipal) -> None:
    await room_for(principal)


# On each route that accepts new work: generations, edits, variations, batches, uploads.
StorageRoom = Depends(storage_room)
WeaveStorageRoom = Depends(weave_storage_room)
SettingsDep = Annotated[Settings, Depends(settings_dep)]
StorageDep = Annotated[Storage, Depends(storage_dep)]
BaseUrl = Annotated[str, Depends(base_url)]
Links = Annotated[ImageLinks, Depends(image_links)]

# A client's key for retrying a POST that creates something (shared/idempotency).
IdempotencyKeyHeader = Annotated[str | None, Header(alias="Idempotency-Key")]
# A list's cursor, as OpenAI's lists take it.
After = Annotated[
    str | None,
    Query(max_length=64, description="The previous page's `last_id`: list what comes after it"),
]


@dataclass(frozen=True)
class Claims:
    """The request's Idempotency-Key, made into its claim once the route has the
    body it is bound to (shared/idempotency): ``claims(body)``."""

    key: str | None
    method: str
    path: str

    def __call__(self, body: Any) -> Claim | None:
        return claim_of(self.key, self.method, self.path, body)


async def idempotency_claims(
    request: Request, idempotency_key: IdempotencyKeyHeader = None
) -> Claims:
    return Claims(idempotency_key, request.method, request.url.path)


IdempotencyClaims = Annotated[Claims, Depends(idempotency_claims)]
