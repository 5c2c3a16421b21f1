"""Projects and API keys. Keys are random 256-bit tokens stored as SHA-256 hashes.

A fast hash is right here (unlike for passwords): the key has full entropy, so
there is nothing to brute-force, and lookup must be cheap on every request.
A key's principal is cached in each API process (``PRINCIPALS``) only while that
process hears invalidations over Redis, and a revocation or a change of limits
drops it everywhere after commit, so a revocation still holds at once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.audit.service import record
from shared.core.clock import utcnow
from shared.core.errors import Conflict, InvalidRequest, NotFound
from shared.core.invalidation import InvalidatedCache, invalidate
from shared.core.outbox import after_commit
from shared.core.settings import get_settings
from shared.projects.models import ApiKey, Project

KEY_PREFIX = "sk-ig-"
# last_used_at is written at most this often per key: a write per request would
# turn every read into a write.
LAST_USED_RESOLUTION = timedelta(seconds=60)


# Known keys by hash (see shared/core/invalidation.py for when a process caches).
PRINCIPALS_CACHE = "principals"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key, its user identity and the project it belongs to."""

    key_id: str
    project_id: str
    project_name: str
    user: str
    key_requests_per_minute: int | None = None
    images_per_day: int | None = None
    jobs_in_flight: int | None = None
    # Budgets in USD (shared/projects/budgets.py): the project's, and the key's own.
    daily_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    key_daily_budget_usd: float | None = None
    key_monthly_budget_usd: float | None = None
    # The project's storage quota in bytes (shared/quota.py); None: none, and no check.
    storage_quota_bytes: int | None = None
    # The project's image retention in seconds (None: forever): caps a request's
    # Image-Expires-After and the life of its images' URLs (shared/retention/).
    image_retention_seconds: int | None = None

    def owns_project(self, project_ref: str) -> bool:
        """Weave's ``project_id`` names the project by name (``entity/project``) or id."""
        return project_ref in (self.project_name, self.project_id)


def get_project(session: Session, name: str) -> Project:
    project = session.exec(select(Project).where(col(Project.name) == name)).first()
    if project is None:
        raise NotFound(f"No project named '{name}'.", param="project")
    return project


def create_project(
    session: Session,
    name: str,
    *,
    key_requests_per_minute: int | None = None,
    images_per_day: int | None = None,
    jobs_in_flight: int | None = None,
    daily_budget_usd: float | None = None,
    monthly_budget_usd: float | None = None,
    storage_quota_bytes: int | None = None,
    actor: str | None = None,
) -> Project:
    """Create a project. ``actor``: who asks, for the audit trail (``shared/audit``);
    None only for set-up that is no admin action (a key's project made with it)."""
    name = name.strip()
    if not name:
        raise InvalidRequest("A project needs a name.", param="name")
    _limits_enforceable(
        key_requests_per_minute=key_requests_per_minute,
        images_per_day=images_per_day,
        jobs_in_flight=jobs_in_flight,
    )
    _budgets_valid(daily_budget_usd=daily_budget_usd, monthly_budget_usd=monthly_budget_usd)
    if session.exec(select(Project).where(col(Project.name) == name)).first() is not None:
        raise Conflict(f"A project named '{name}' exists already.", param="name")
    project = Project(
        name=name,
        key_requests_per_minute=key_requests_per_minute,
        images_per_day=images_per_day,
        jobs_in_flight=jobs_in_flight,
        daily_budget_usd=daily_budget_usd,
        monthly_budget_usd=monthly_budget_usd,
        storage_quota_bytes=storage_quota_bytes,
    )
    session.add(project)
    session.flush()
    if actor is not None:
        settings = {
            field: getattr(project, field)
            for field in LIMITS + BUDGETS + QUOTAS
            if getattr(project, field) is not None
        }
        record(
            session,
            actor,
            "project.create",
            project.id,
            {"name": project.name, **settings},
            project_id=project.id,
        )
    return project


def _limits_enforceable(**limits: float | None) -> None:
    """Limits are counted in Redis (shared/projects/limits.py): without it (embedded
    mode) they would be accepted and never enforced, so they are refused instead."""
    given = [field for field, value in limits.items() if value]
    if given and not get_settings().redis_url:
        raise InvalidRequest(
            f"'{given[0]}' cannot be enforced here: limits are counted in Redis, and this "
            "setup has none (set IMAGEGEN_REDIS_URL).",
            param=given[0],
        )


def _budgets_valid(**budgets: float | None) -> None:
    """Budgets are counted in Redis too: refused without it, as limits are (a budget
    of 0 is a budget: nothing priced may run)."""
    for field, value in budgets.items():
        if value is None:
            continue
        if value < 0:
            raise InvalidRequest(f"'{field}' must be 0 or more (USD).", param=field)
        if not get_settings().redis_url:
            raise InvalidRequest(
                f"'{field}' cannot be enforced here: budgets are counted in Redis, and this "
                "setup has none (set IMAGEGEN_REDIS_URL).",
                param=field,
            )


LIMITS = ("key_requests_per_minute", "images_per_day", "jobs_in_flight")
BUDGETS = ("daily_budget_usd", "monthly_budget_usd")
QUOTAS = ("storage_quota_bytes",)


def audit_action(field: str) -> str:
    """The audit trail's action for a change of ``field``: one event per kind of
    setting a change touches (a PATCH of a budget and a limit is two events)."""
    if field in LIMITS:
        return "limits.update"
    if field in BUDGETS:
        return "budget.update"
    if field in QUOTAS:
        return "quota.update"
    if field.endswith("_retention_seconds"):
        return "retention.update"
    return "project.update"


def update_limits(
    session: Session, name: str, *, actor: str | None = None, **limits: float | None
) -> Project:
    """Change the given limits, budgets and storage quota (null: the default limit,
    no budget, no quota), audited as ``actor`` did it."""
    for field in limits:
        if field not in LIMITS + BUDGETS + QUOTAS:
            raise InvalidRequest(f"Unknown limit '{field}'.", param=field)
    _limits_enforceable(**{f: v for f, v in limits.items() if f in LIMITS})
    _budgets_valid(**{f: v for f, v in limits.items() if f in BUDGETS})
    project = get_project(session, name)
    changes: dict[str, dict[str, dict[str, float | None]]] = {}
    for field, value in limits.items():
        if field in LIMITS + QUOTAS and value is not None and value < 0:
            raise InvalidRequest(f"'{field}' must be 0 (unlimited) or more.", param=field)
        before = getattr(project, field)
        changes.setdefault(audit_action(field), {})[field] = {"from": before, "to": value}
        setattr(project, field, value)
    session.add(project)
    session.flush()
    if actor is not None:
        for action, fields in sorted(changes.items()):  # a stable order: by name
            record(
                session,
                actor,
                action,
                project.id,
                {"project": project.name, "changes": fields},
                project_id=project.id,
            )
    after_commit(session, lambda: invalidate(PRINCIPALS_CACHE))  # principals carry limits
    return project


def list_projects(session: Session) -> list[Project]:
    return list(session.exec(select(Project).order_by(col(Project.created_at))))


def create_key(
    session: Session,
    project_name: str,
    name: str = "default",
    user: str = "",
    plaintext: str | None = None,
    *,
    daily_budget_usd: float | None = None,
    monthly_budget_usd: float | None = None,
    actor: str | None = None,
) -> tuple[ApiKey, str]:
    """Create a key (and its project if new), with its own budgets if given; the
    plaintext is returned once, never stored (nor audited: the event names the key's
    id and prefix)."""
    _budgets_valid(daily_budget_usd=daily_budget_usd, monthly_budget_usd=monthly_budget_usd)
    existing = session.exec(select(Project).where(col(Project.name) == project_name)).first()
    project = existing if existing is not None else create_project(session, project_name)
    plaintext = plaintext or KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        project_id=project.id,
        name=name,
        user=user or name,
        prefix=plaintext[:10],
        key_hash=hash_key(plaintext),
        daily_budget_usd=daily_budget_usd,
        monthly_budget_usd=monthly_budget_usd,
    )
    session.add(key)
    session.flush()
    if actor is not None:
        budgets = {"daily_budget_usd": daily_budget_usd, "monthly_budget_usd": monthly_budget_usd}
        record(
            session,
            actor,
            "key.create",
            key.id,
            {
                "project": project.name,
                # A key for a project not there yet makes it: one event says both.
                "project_created": existing is None,
                "name": key.name,
                "user": key.user,
                "prefix": key.prefix,
                **{field: value for field, value in budgets.items() if value is not None},
            },
            project_id=project.id,
        )
    return key, plaintext


def ensure_key(session: Session, project_name: str, plaintext: str) -> ApiKey:
    """Make sure ``plaintext`` is a valid key of the project (the fixed dev key)."""
    existing = session.exec(
        select(ApiKey).where(col(ApiKey.key_hash) == hash_key(plaintext))
    ).first()
    if existing is not None:
        return existing
    key, _ = create_key(session, project_name, name="dev", plaintext=plaintext)
    return key


def list_keys(session: Session, project_name: str | None = None) -> list[tuple[ApiKey, Project]]:
    query = select(ApiKey, Project).join(Project, col(Project.id) == col(ApiKey.project_id))
    if project_name is not None:
        query = query.where(col(Project.name) == project_name)
    return [(k, p) for k, p in session.exec(query.order_by(col(ApiKey.created_at)))]


def revoke_key(session: Session, key_id: str, *, actor: str | None = None) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"No key with id '{key_id}'.", param="key_id")
    if actor is not None:
        details = {"name": key.name, "already_revoked": key.revoked_at is not None}
        record(session, actor, "key.revoke", key.id, details, project_id=key.project_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        session.flush()
        digest = key.key_hash
        after_commit(session, lambda: invalidate(PRINCIPALS_CACHE, digest))
    return key


@dataclass
class KnownKey:
    """A cached principal, and when its key's ``last_used_at`` was last written."""

    principal: Principal
    used_at: datetime


KNOWN_KEYS: InvalidatedCache[KnownKey] = InvalidatedCache(PRINCIPALS_CACHE)


def authenticate(session: Session, plaintext: str) -> KnownKey | None:
    row = session.exec(
        select(ApiKey, Project)
        .join(Project, col(Project.id) == col(ApiKey.project_id))
        .where(col(ApiKey.key_hash) == hash_key(plaintext), col(ApiKey.revoked_at).is_(None))
    ).first()
    if row is None:
        return None
    key, project = row
    now = utcnow()
    used_at = key.last_used_at
    if used_at is None or touch_due(used_at, now):
        touch_key(session, key.id, now)
        used_at = now
    principal = Principal(
        key_id=key.id,
        project_id=project.id,
        project_name=project.name,
        user=key.user or key.id,
        key_requests_per_minute=project.key_requests_per_minute,
        images_per_day=project.images_per_day,
        jobs_in_flight=project.jobs_in_flight,
        daily_budget_usd=project.daily_budget_usd,
        monthly_budget_usd=project.monthly_budget_usd,
        key_daily_budget_usd=key.daily_budget_usd,
        key_monthly_budget_usd=key.monthly_budget_usd,
        storage_quota_bytes=project.storage_quota_bytes,
        image_retention_seconds=project.image_retention_seconds,
    )
    return KnownKey(principal, used_at)


def touch_key(session: Session, key_id: str, now: datetime) -> None:
    session.execute(sa.update(ApiKey).where(col(ApiKey.id) == key_id).values(last_used_at=now))


def touch_due(used_at: datetime, now: datetime) -> bool:
    """Whether a key's ``last_used_at`` is due to be written again."""
    return now - used_at > LAST_USED_RESOLUTION
