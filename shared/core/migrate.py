"""Apply Alembic migrations (``imagegen migrate``; ``imagegen dev`` runs it itself)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations

_DIR = Path(migrations.__file__).parent


def alembic_config() -> Config:
    return Config(str(_DIR / "alembic.ini"))


def upgrade(revision: str = "head") -> None:
    command.upgrade(alembic_config(), revision)
