"""The checks a command makes before it starts: each refuses with one line naming
the fix (exit 1 or 2), or warns and lets it start."""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from shared.core.settings import Settings
    from shared.registry import Registry

console = Console(stderr=True)


def refuse(message: str) -> NoReturn:
    """The command's one-line refusal, naming the fix; exit 1."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


def registry_or_exit() -> Registry:
    """The model registry, or one line naming the entry and field that is wrong."""
    from shared.registry import RegistryError, get_registry

    try:
        return get_registry()
    except RegistryError as exc:
        console.print(f"[red]models file: {exc}[/red]", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def migrated_or_exit() -> None:
    """The API and workers refuse an unmigrated database, in one line naming the fix.
    An unreachable one is said, and they start all the same: an outage must not
    keep them down (the API answers 503 and /readyz says why until it is back;
    workers wait for it)."""
    import sqlalchemy.exc

    from shared.core.migrate import pending

    try:
        problem = pending()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        missing = _missing_database(exc)
        if missing:
            refuse(missing)
        console.print(
            f"[yellow]warning:[/yellow] cannot reach the database at {_database_at()}: "
            f"{_first_line(exc)}; starting anyway (requests answer 503 until it is back).",
            soft_wrap=True,
            highlight=False,
        )
        return
    if problem:
        refuse(problem)


def _database_at() -> str:
    """The database's URL without its password."""
    import sqlalchemy

    from shared.core.settings import get_settings

    url = sqlalchemy.engine.make_url(get_settings().resolved_database_url)
    return url.render_as_string(hide_password=True)


def _first_line(exc: Exception) -> str:
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0]


def _missing_database(exc: Exception) -> str | None:
    """A PostgreSQL server that answers but has no such database: a setup step, not
    an outage, so it is refused with the fix. (psycopg gives no SQLSTATE for a
    refused connection: the server's message is all there is.)"""
    import re

    found = re.search(r'database "([^"]+)" does not exist', str(exc))
    if not found:
        return None
    name = found.group(1)
    return (
        f"the database '{name}' does not exist at {_database_at()}: create it "
        f'(`createdb {name}`, or `CREATE DATABASE "{name}";` in psql), then run '
        "`imagegen migrate`."
    )


def upgrade_or_exit() -> None:
    """Migrations applied, or one line saying which database could not be reached
    (or does not exist) and what to do."""
    import sqlalchemy.exc

    from shared.core.migrate import upgrade

    try:
        upgrade()
    except sqlalchemy.exc.OperationalError as exc:
        problem = _missing_database(exc) or (
            f"cannot reach the database at {_database_at()}: {_first_line(exc)}. Start it, "
            "or point IMAGEGEN_DATABASE_URL at one."
        )
        refuse(problem)


def port_free_or_exit(host: str, port: int) -> None:
    """Refuse a port something already listens on, before anything is printed or
    started (uvicorn would fail only after the worker and the key)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            refuse(
                f"cannot listen on {host}:{port} ({exc.strerror}); "
                "choose another port with --port or IMAGEGEN_PORT."
            )


def lock_data_dir_or_exit(data_dir: Path) -> IO[str]:
    """One `imagegen dev` per data directory: a second would run beside the first on
    the same database and files. The lock lasts as long as the process."""
    import fcntl

    lock = (data_dir / "dev.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        refuse(
            f"another `imagegen dev` is running on {data_dir.resolve()}; "
            "stop it, or give this one its own IMAGEGEN_DATA_DIR."
        )
    return lock


def say_if_storage_is_out() -> None:
    """Storage out at start: said at once (jobs wait for it, and /readyz says 503),
    not discovered by the first request minutes later."""
    from shared.core.health import PROBES

    try:
        PROBES["storage"]()
    except Exception as exc:  # any failure: report it, start all the same
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        console.print(
            f"[yellow]warning:[/yellow] storage is not ready ({reason}); jobs will wait for "
            "it and /readyz answers 503 until it is.",
            soft_wrap=True,
            highlight=False,
        )


def host_local_parts(settings: Settings) -> list[str]:
    """What of this configuration only processes on this host (sharing its data
    dir) can see, where the database is a server that processes on other hosts
    share: then an API host's jobs would wait in a folder no worker host reads,
    or a worker host's images sit where no API host finds them, silently. Empty
    with SQLite (one host by nature) or with nothing host-local."""
    if settings.resolved_database_url.startswith("sqlite"):
        return []
    parts = []
    if settings.embedded_broker:
        parts.append(f"the broker (a folder, {settings.broker_dir}; set IMAGEGEN_BROKER_URL)")
    if not settings.s3_bucket:
        parts.append(f"stored images ({settings.files_dir}; set IMAGEGEN_S3_BUCKET)")
    return parts


def say_if_host_local() -> None:
    """A server database beside host-local parts: said at start, since several API
    and worker hosts on this configuration lose each other's work without an error
    (one host sharing its data dir is fine, so it starts all the same)."""
    from shared.core.settings import get_settings

    parts = host_local_parts(get_settings())
    if parts:
        console.print(
            "[yellow]warning:[/yellow] the database is shared, but "
            + " and ".join(parts)
            + " only this host's processes see: fine on one host, not across several.",
            soft_wrap=True,
            highlight=False,
        )
