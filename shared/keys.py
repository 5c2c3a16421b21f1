"""Projects and API keys. Keys are random 256-bit tokens stored as SHA-256 hashes.

A fast hash is right here (unlike for passwords): the key has full entropy, so
there is nothing to brute-force, and lookup must be cheap on every request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlmodel import Session, select

from shared.models import ApiKey, Project

KEY_PREFIX = "sk-ig-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key and the project it belongs to."""

    key_id: str
    project_id: str
    project_name: str


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.exec(select(Project).where(Project.name == name)).first()
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_key(session: Session, project_name: str, name: str = "default",
               plaintext: str | None = None) -> tuple[ApiKey, str]:
    """Create a key; the plaintext is returned once and never stored."""
    project = get_or_create_project(session, project_name)
    plaintext = plaintext or KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(project_id=project.id, name=name, prefix=plaintext[:10],
                 key_hash=hash_key(plaintext))
    session.add(key)
    session.flush()
    return key, plaintext


def ensure_key(session: Session, project_name: str, plaintext: str) -> ApiKey:
    """Make sure ``plaintext`` is a valid key of the project (the fixed dev key)."""
    existing = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext))).first()
    if existing is not None:
        return existing
    key, _ = create_key(session, project_name, name="dev", plaintext=plaintext)
    return key


def authenticate(session: Session, plaintext: str) -> Principal | None:
    row = session.exec(
        select(ApiKey, Project)
        .join(Project, Project.id == ApiKey.project_id)  # type: ignore[arg-type]
        .where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
    ).first()
    if row is None:
        return None
    key, project = row
    return Principal(key_id=key.id, project_id=project.id, project_name=project.name)
