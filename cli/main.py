"""The ``imagegen`` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich.console import Console

from cli import tables
from cli.batch import batch_app
from cli.client import resolve_key
from cli.jobs import jobs_app

if TYPE_CHECKING:
    from sqlmodel import Session

    from shared.registry import Registry

app = typer.Typer(
    help="imagegen: image generation with an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: no boxes, and no "<bool>" beside flags (click's own layout).
    rich_markup_mode=None,
)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(keys_app, name="keys")
projects_app = typer.Typer(help="Manage projects.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(projects_app, name="projects")


app.add_typer(batch_app, name="batch")
app.add_typer(jobs_app, name="jobs")
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"imagegen {version('imagegen')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """imagegen: image generation with an OpenAI-compatible API."""


def _registry_or_exit() -> Registry:
    """The model registry, or one line naming the entry and field that is wrong."""
    from shared.registry import RegistryError, get_registry

    try:
        return get_registry()
    except RegistryError as exc:
        console.print(f"[red]models file: {exc}[/red]", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def _migrated_or_exit() -> None:
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
            console.print(f"[red]error:[/red] {missing}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None
        console.print(
            f"[yellow]warning:[/yellow] cannot reach the database at {_database_at()}: "
            f"{_first_line(exc)}; starting anyway (requests answer 503 until it is back).",
            soft_wrap=True,
            highlight=False,
        )
        return
    if problem:
        console.print(f"[red]error:[/red] {problem}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)


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


def _upgrade_or_exit() -> None:
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
        console.print(f"[red]error:[/red] {problem}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


def _port_free_or_exit(host: str, port: int) -> None:
    """Refuse a port something already listens on, before anything is printed or
    started (uvicorn would fail only after the worker and the key)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            console.print(
                f"[red]error:[/red] cannot listen on {host}:{port} ({exc.strerror}); "
                "choose another port with --port or IMAGEGEN_PORT.",
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(1) from None


def _lock_data_dir_or_exit(data_dir: Path) -> IO[str]:
    """One `imagegen dev` per data directory: a second would run beside the first on
    the same database and files. The lock lasts as long as the process."""
    import fcntl

    lock = (data_dir / "dev.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        console.print(
            f"[red]error:[/red] another `imagegen dev` is running on {data_dir.resolve()}; "
            "stop it, or give this one its own IMAGEGEN_DATA_DIR.",
            soft_wrap=True,
            highlight=False,
        )
        raise typer.Exit(1) from None
    return lock


def _say_if_storage_is_out() -> None:
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


@contextmanager
def _admin_session() -> Iterator[Session]:
    """Keys and projects live in the server's database: found (or refused with the
    fix) when a command runs, so that ``--help`` works anywhere."""
    from shared.core.db import unit_of_work

    _data_or_exit()
    with unit_of_work() as session:
        yield session


def _data_or_exit() -> None:
    """Admin commands (keys, projects) act on the data a server uses: refuse, with
    the fix, where there is none (instead of making an empty database here)."""
    from shared.core.settings import get_settings

    settings = get_settings()
    if not settings.database_url:
        database = (settings.data_dir / "imagegen.db").resolve()
        if not database.exists():
            console.print(
                f"[red]error:[/red] no imagegen data at {database.parent}: run this where "
                "`imagegen dev` runs (its data is ./.imagegen), set IMAGEGEN_DATA_DIR (or "
                "IMAGEGEN_DATABASE_URL) to the server's, or create it with `imagegen migrate`.",
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(1)
    _migrated_or_exit()


def _serve_api(host: str | None, port: int | None) -> None:
    import uvicorn

    from api.slow_clients import SlowClientGuard
    from shared.core.logs import configure
    from shared.core.settings import get_settings

    _registry_or_exit()

    settings = get_settings()
    _port_free_or_exit(host or settings.host, port or settings.port)
    configure(settings)  # uvicorn's own loggers too (log_config=None): one format
    _say_if_storage_is_out()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=5,
        http=SlowClientGuard,  # a deadline on each request's headers
    )


@app.command()
def migrate() -> None:
    """Apply database migrations."""
    _upgrade_or_exit()
    console.print("[green]database is up to date[/green]")


@app.command()
def api(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Run the HTTP API."""
    _migrated_or_exit()
    _serve_api(host, port)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues")] = "default,webhooks,batch",
    concurrency: Annotated[int | None, typer.Option(help="Provider calls held at once")] = None,
    sweeper: Annotated[bool, typer.Option(help="Run the lease/outbox sweeper here")] = True,
    device: Annotated[
        str | None, typer.Option(help="Run local models on this device (cuda:1, cpu)")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve this host's metrics (Prometheus) on this port")
    ] = None,
) -> None:
    """Run a worker: a supervisor whose consumer processes each hold many provider
    calls at once, started again whenever one dies (with the batch queue among
    others, batch lines run in a second consumer at lower priority; the queues of
    local models, `--queues gpu`, in a consumer of their own, one job at a time)."""
    from shared.core.settings import get_settings
    from worker.supervisor import supervise

    if device is not None:
        os.environ["IMAGEGEN_DEVICE"] = device  # read by the consumers it starts
        get_settings.cache_clear()
    local_queues = _registry_or_exit().local_queues
    _migrated_or_exit()
    if metrics_port is not None:
        # A worker host's own scrape target (its processes' counters; the work's
        # gauges are the API's /metrics).
        from shared.core.instruments import serve

        serve(metrics_port)
    supervise(get_settings(), queues.split(","), concurrency, sweeper, local_queues)


@app.command()
def dev(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """API and worker together on embedded defaults (SQLite, local files, no Redis)."""
    from shared.core.db import unit_of_work
    from shared.core.private_files import private_dir, read_private_file
    from shared.core.settings import get_settings
    from shared.projects.service import KEY_PREFIX, ensure_key

    settings = get_settings()
    private_dir(settings.data_dir)  # 0700: it holds the secrets and the database
    lock = _lock_data_dir_or_exit(settings.data_dir)  # noqa: F841  (held until exit)
    _port_free_or_exit(host or settings.host, port or settings.port)
    _upgrade_or_exit()
    key = settings.dev_api_key
    key_file = settings.data_dir / "dev_api_key"
    if not key:
        import secrets

        key = read_private_file(key_file, lambda: KEY_PREFIX + secrets.token_urlsafe(32))
    with unit_of_work() as session:
        ensure_key(session, "default", key)
    from worker.supervisor import WorkerGroup

    # Local models' queues too, each in a consumer of its own (worker/supervisor.py).
    local = sorted(_registry_or_exit().local_queues)
    queues = ["default", "webhooks", settings.batch_queue, *local]
    worker_proc = WorkerGroup(settings, queues, local_queues=local)
    url = f"http://{host or settings.host}:{port or settings.port}"
    console.print(f"[bold]imagegen[/bold] dev server on {url}")
    console.print(f"data: {settings.data_dir.resolve()} (IMAGEGEN_DATA_DIR)", highlight=False)
    console.print(f"API key: [bold]{key}[/bold]", soft_wrap=True)
    console.print(
        f'  curl {url}/v1/images/generations -H "Authorization: Bearer {key}" '
        "-H 'Content-Type: application/json' -d '{\"prompt\": \"a red fox\"}'",
        soft_wrap=True,
        highlight=False,
    )
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default
    # handler that ends the process before `finally` could stop the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _serve_api(host, port)
    finally:
        worker_proc.stop(timeout=10)


@keys_app.command("create")
def keys_create(
    project: Annotated[str, typer.Option(help="Project name")],
    name: Annotated[str, typer.Option(help="Key name")] = "default",
    user: Annotated[str, typer.Option(help="User identity (wb_user_id)")] = "",
) -> None:
    """Create an API key for PROJECT (created if new). The key is printed once."""
    from shared.projects.service import create_key

    with _admin_session() as session:
        key, plaintext = create_key(session, project, name, user)
    console.print(f"[green]created key {key.id} for project '{project}'[/green] (shown only once):")
    print(plaintext)


@keys_app.command("list")
def keys_list(
    project: Annotated[str | None, typer.Option(help="Only this project")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line")] = False,
) -> None:
    """List keys (prefix, user, created, last used, revoked); never the keys themselves."""
    from shared.projects.service import list_keys

    table = tables.table(
        "id", "project", "name", "user", "prefix", "created", "last used", "revoked"
    )
    with _admin_session() as session:
        for key, proj in list_keys(session, project):
            if as_json:
                print(
                    json.dumps(
                        {
                            "id": key.id,
                            "project": proj.name,
                            "name": key.name,
                            "user": key.user,
                            "prefix": key.prefix,
                            "created_at": _when(key.created_at),
                            "last_used_at": _when(key.last_used_at),
                            "revoked_at": _when(key.revoked_at),
                        }
                    )
                )
            table.add_row(
                key.id,
                proj.name,
                key.name,
                key.user,
                key.prefix + "...",
                _when(key.created_at),
                _when(key.last_used_at),
                _when(key.revoked_at),
            )
    if not as_json:
        Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id; it stops working at once."""
    from shared.projects.service import revoke_key

    with _admin_session() as session:
        revoke_key(session, key_id)
    console.print(f"[green]revoked {key_id}[/green]")


LimitOption = Annotated[int | None, typer.Option(help="0 = unlimited; unset = default")]
RpmOption = Annotated[int | None, typer.Option("--key-requests-per-minute", help="0 = unlimited")]


@projects_app.command("create")
def projects_create(
    name: str,
    rpm: RpmOption = None,
    images_per_day: LimitOption = None,
    jobs_in_flight: LimitOption = None,
) -> None:
    """Create a project, optionally with its own limits."""
    from shared.projects.service import create_project

    with _admin_session() as session:
        project = create_project(
            session,
            name,
            key_requests_per_minute=rpm,
            images_per_day=images_per_day,
            jobs_in_flight=jobs_in_flight,
        )
    console.print(f"[green]created project '{name}'[/green] ({project.id})")


@projects_app.command("set-limits")
def projects_set_limits(
    name: str,
    rpm: RpmOption = None,
    images_per_day: LimitOption = None,
    jobs_in_flight: LimitOption = None,
) -> None:
    """Change a project's limits (only the ones given)."""
    from shared.projects.service import update_limits

    given = {
        "key_requests_per_minute": rpm,
        "images_per_day": images_per_day,
        "jobs_in_flight": jobs_in_flight,
    }
    with _admin_session() as session:
        update_limits(session, name, **{k: v for k, v in given.items() if v is not None})
    console.print(f"[green]updated project '{name}'[/green]")


@projects_app.command("list")
def projects_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line")] = False,
) -> None:
    """List projects and their limits."""
    from shared.projects.service import list_projects

    table = tables.table(
        "id", "name", "created", "requests/min/key", "images/day", "jobs in flight"
    )
    with _admin_session() as session:
        for p in list_projects(session):
            if as_json:
                limits = ("key_requests_per_minute", "images_per_day", "jobs_in_flight")
                row = {"id": p.id, "name": p.name, "created_at": _when(p.created_at)}
                print(json.dumps(row | {name: getattr(p, name) for name in limits}))
                continue
            table.add_row(
                p.id,
                p.name,
                _when(p.created_at),
                _limit(p.key_requests_per_minute),
                _limit(p.images_per_day),
                _limit(p.jobs_in_flight),
            )
    if not as_json:
        Console().print(table)


def _when(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%d %H:%M") if value else None


def _limit(value: int | None) -> str:
    return "default" if value is None else ("unlimited" if value == 0 else str(value))


@app.command()
def generate(
    prompt: str,
    model: Annotated[str | None, typer.Option()] = None,
    size: Annotated[str | None, typer.Option()] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="How many images")] = 1,
    out: Annotated[Path, typer.Option(help="Directory for the images")] = Path("."),
    base_url: Annotated[str, typer.Option(envvar="IMAGEGEN_URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="IMAGEGEN_API_KEY")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: the files and seconds taken")
    ] = False,
) -> None:
    """Generate images on a running server and save them to OUT."""
    from cli.client import generate_images

    key = resolve_key(api_key)
    started = time.monotonic()
    paths = generate_images(
        base_url, key, prompt, model=model, size=size, n=n, out=out, console=console
    )
    seconds = round(time.monotonic() - started, 3)
    if as_json:
        print(json.dumps({"files": [str(p) for p in paths], "seconds": seconds}))
        return
    for path in paths:
        print(path)
    console.print(f"[green]{len(paths)} image(s) in {seconds:.1f}s[/green]")


def _origin(exc: httpx.ConnectError) -> str:
    try:
        url = exc.request.url
    except RuntimeError:  # no request attached
        return "the server's address"
    return f"{url.scheme}://{url.netloc.decode()}"


def _enable_metrics() -> None:
    """Metrics of this process and those it starts go to the data dir's (or
    IMAGEGEN_METRICS_DIR's) files, summed by one scrape (shared/core/metrics.py)."""
    from shared.core.metrics import enable
    from shared.core.settings import get_settings

    settings = get_settings()
    enable(settings.metrics_dir or settings.data_dir / "metrics")


def _without_text_type(display: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """An argument's help line without typer's ``<str>`` (``PROMPT``, not
    ``PROMPT <str>``); other types (``<int>``, a path) still show."""

    def shown(ctx: Any) -> str | None:
        label = display(ctx)
        return None if label == "<str>" else label

    return shown


def _name_values(command: Any) -> None:
    """Help names what a value is (``--model MODEL``, ``PROMPT``), not its Python
    type (typer's ``<str>``). Duck-typed: typer carries its own copy of click."""
    for param in command.params:
        if param.metavar is None and not getattr(param, "is_flag", False) and param.name:
            param.metavar = param.name.upper()
        if param.param_type_name == "argument" and hasattr(param, "display_type_rich"):
            param.display_type_rich = _without_text_type(param.display_type_rich)
    for sub in getattr(command, "commands", {}).values():
        _name_values(sub)


def main() -> None:
    """Entry point: errors the user can act on print as one line, not a traceback."""
    from shared.core.errors import ImagegenError
    from shared.core.redact import install

    install()  # before anything logs: no secret in any line of this process
    _enable_metrics()
    command = typer.main.get_command(app)
    _name_values(command)
    try:
        command(prog_name="imagegen")
    except ImagegenError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        sys.exit(1)
    except httpx.ConnectError as exc:
        # A client command (generate, batch) whose server is not there.
        console.print(
            f"[red]error:[/red] nothing answered at {_origin(exc)} (start one with "
            "`imagegen dev`, or give --base-url / IMAGEGEN_URL).",
            soft_wrap=True,
            highlight=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
