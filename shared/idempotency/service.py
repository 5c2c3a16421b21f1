"""``Idempotency-Key``: a POST that creates something, sent again with the same key
and the same body within 24 hours, answers with what the first one created (the
same job, batch or file); with another body, 409. Keys are scoped to the project.

The key's row is written in the same transaction as what it names, so a crash
leaves both or neither. Two twins at once: the second's insert meets the first's
primary key (PostgreSQL makes it wait for the first to commit), and the caller
then reads the first's row (``recall``) and answers with its resource.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from shared.core.clock import utcnow
from shared.core.columns import table
from shared.core.errors import Conflict, InvalidRequest
from shared.idempotency.models import MAX_KEY_LENGTH, IdempotencyKey

HEADER = "Idempotency-Key"
KEEP = timedelta(hours=24)


@dataclass(frozen=True)
class Claim:
    """A request's key and the fingerprint of what it asks."""

    key: str
    fingerprint: str


def claim_of(key: str | None, method: str, path: str, body: Any) -> Claim | None:
    """The request's claim, or None without a key. ``body``: its parsed content
    (JSON, or the fields of a form), canonicalised so key order does not matter."""
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"'{HEADER}' must be 1 to {MAX_KEY_LENGTH} characters.", param=HEADER)
    canonical = json.dumps([method, path, body], sort_keys=True, default=str)
    return Claim(key, hashlib.sha256(canonical.encode()).hexdigest())


def recall(session: Session, project_id: str, claim: Claim, resource: str) -> str | None:
    """The id of what the key created, or None when the key is unused (an expired
    row is removed). Another request under the same key: 409."""
    row = session.get(IdempotencyKey, (project_id, claim.key))
    if row is None:
        return None
    if row.expires_at < utcnow():
        session.delete(row)
        session.flush()
        return None
    if row.fingerprint != claim.fingerprint or row.resource != resource:
        raise Conflict(
            f"This {HEADER} was already used with another request; use a new key for a "
            "new request.",
            param=HEADER,
            code="idempotency_key_reused",
        )
    return row.resource_id


def once(
    session: Session,
    project_id: str,
    claim: Claim | None,
    resource: str,
    create: Callable[[], str],
) -> str:
    """The id of what ``claim`` created; ``create`` makes it (in the caller's
    transaction) when the key is new. The key's row is written first, so of two
    twins only one creates anything: the other's insert fails (in PostgreSQL, once
    the first commits) and it answers with the first's resource."""
    if claim is None:
        return create()
    earlier = recall(session, project_id, claim, resource)
    if earlier is not None:
        return earlier
    try:
        remember(session, project_id, claim, resource, "")
    except IntegrityError:
        session.rollback()  # nothing else was written yet in this transaction
        twin = recall(session, project_id, claim, resource)
        if twin is None:
            raise
        return twin
    resource_id = create()
    session.execute(
        sa.update(IdempotencyKey)
        .where(col(IdempotencyKey.project_id) == project_id, col(IdempotencyKey.key) == claim.key)
        .values(resource_id=resource_id)
    )
    return resource_id


def remember(
    session: Session, project_id: str, claim: Claim, resource: str, resource_id: str
) -> None:
    """Record the key with what it created, in the caller's transaction."""
    now = utcnow()
    session.execute(
        sa.insert(table(IdempotencyKey)),
        [
            {
                "project_id": project_id,
                "key": claim.key,
                "fingerprint": claim.fingerprint,
                "resource": resource,
                "resource_id": resource_id,
                "created_at": now,
                "expires_at": now + KEEP,
            }
        ],
    )


def purge_expired(session: Session) -> int:
    """Remove keys past their 24 hours (the sweeper calls it)."""
    result = session.execute(
        sa.delete(IdempotencyKey).where(col(IdempotencyKey.expires_at) < utcnow())
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
