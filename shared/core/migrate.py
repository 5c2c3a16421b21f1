"""Apply Alembic migrations (``imagegen migrate``; ``imagegen dev`` runs it itself)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations

_DIR = Path(migrations.__file__).parent


def alembic_config() -> Config:
    return Config(str(_DIR / "alembic.ini"))


def upgrade(revision: str = "head") -> None:
    command.upgrade(alembic_config(), revision)


def pending() -> str | None:
    """Why the database is not ready for the API or a worker, naming the fix; None
    when its schema is the code's. Raises the driver's error if it cannot be reached."""
    from shared.core.db import get_engine

    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    with get_engine().connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    if set(current) == heads:
        return None
    if not current:
        return "the database has no tables yet: run `imagegen migrate` first."
    return (
        f"the database is at revision {', '.join(current)}, the code needs "
        f"{', '.join(sorted(heads))}: run `imagegen migrate`."
    )
