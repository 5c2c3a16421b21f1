"""Database administration: ``imagegen migrate``, ``keys``, ``projects`` and
``audit``, acting on the server's database from where the command runs. Each change
is recorded in the audit trail (shared/audit) as done by ``cli``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from cli import tables
from cli.startup import migrated_or_exit, refuse, upgrade_or_exit

if TYPE_CHECKING:
    from sqlmodel import Session

keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True, rich_markup_mode=None)
projects_app = typer.Typer(help="Manage projects.", no_args_is_help=True, rich_markup_mode=None)
console = Console(stderr=True)


def migrate() -> None:
    """Apply database migrations."""
    upgrade_or_exit()
    console.print("[green]database is up to date[/green]")


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
            refuse(
                f"no imagegen data at {database.parent}: run this where "
                "`imagegen dev` runs (its data is ./.imagegen), set IMAGEGEN_DATA_DIR (or "
                "IMAGEGEN_DATABASE_URL) to the server's, or create it with `imagegen migrate`."
            )
    migrated_or_exit()


BudgetOption = Annotated[
    float | None, typer.Option(help="USD; a request it cannot cover answers 429", min=0)
]


@keys_app.command("create")
def keys_create(
    project: Annotated[str, typer.Option(help="Project name")],
    name: Annotated[str, typer.Option(help="Key name")] = "default",
    user: Annotated[str, typer.Option(help="User identity (wb_user_id)")] = "",
    daily_budget_usd: BudgetOption = None,
    monthly_budget_usd: BudgetOption = None,
) -> None:
    """Create an API key for PROJECT (created if new), with its own budgets if given
    (beside its project's). The key is printed once."""
    from shared.audit.service import CLI
    from shared.projects.service import create_key

    with _admin_session() as session:
        key, plaintext = create_key(
            session,
            project,
            name,
            user,
            daily_budget_usd=daily_budget_usd,
            monthly_budget_usd=monthly_budget_usd,
            actor=CLI,
        )
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
                            "daily_budget_usd": key.daily_budget_usd,
                            "monthly_budget_usd": key.monthly_budget_usd,
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
    from shared.audit.service import CLI
    from shared.projects.service import revoke_key

    with _admin_session() as session:
        revoke_key(session, key_id, actor=CLI)
    console.print(f"[green]revoked {key_id}[/green]")


LimitOption = Annotated[int | None, typer.Option(help="0 = unlimited; unset = default")]
RpmOption = Annotated[int | None, typer.Option("--key-requests-per-minute", help="0 = unlimited")]
QuotaOption = Annotated[
    int | None,
    typer.Option(
        "--storage-quota-bytes",
        help="Bytes the project may keep stored; reached, new work answers 429",
        min=0,
    ),
]


@projects_app.command("create")
def projects_create(
    name: str,
    rpm: RpmOption = None,
    images_per_day: LimitOption = None,
    jobs_in_flight: LimitOption = None,
    daily_budget_usd: BudgetOption = None,
    monthly_budget_usd: BudgetOption = None,
    storage_quota_bytes: QuotaOption = None,
) -> None:
    """Create a project, optionally with its own limits, budgets and storage quota."""
    from shared.audit.service import CLI
    from shared.projects.service import create_project

    with _admin_session() as session:
        project = create_project(
            session,
            name,
            key_requests_per_minute=rpm,
            images_per_day=images_per_day,
            jobs_in_flight=jobs_in_flight,
            daily_budget_usd=daily_budget_usd,
            monthly_budget_usd=monthly_budget_usd,
            storage_quota_bytes=storage_quota_bytes,
            actor=CLI,
        )
    console.print(f"[green]created project '{name}'[/green] ({project.id})")


@projects_app.command("set-limits")
def projects_set_limits(
    name: str,
    rpm: RpmOption = None,
    images_per_day: LimitOption = None,
    jobs_in_flight: LimitOption = None,
    daily_budget_usd: BudgetOption = None,
    monthly_budget_usd: BudgetOption = None,
    no_budgets: Annotated[
        bool, typer.Option("--no-budgets", help="Remove both budgets (nothing else given)")
    ] = False,
    storage_quota_bytes: QuotaOption = None,
    no_storage_quota: Annotated[
        bool, typer.Option("--no-storage-quota", help="Remove the storage quota")
    ] = False,
) -> None:
    """Change a project's limits, budgets and storage quota (only the ones given)."""
    from shared.audit.service import CLI
    from shared.projects.service import update_limits

    given: dict[str, float | None] = {
        "key_requests_per_minute": rpm,
        "images_per_day": images_per_day,
        "jobs_in_flight": jobs_in_flight,
        "daily_budget_usd": daily_budget_usd,
        "monthly_budget_usd": monthly_budget_usd,
        "storage_quota_bytes": storage_quota_bytes,
    }
    changes: dict[str, float | None] = {k: v for k, v in given.items() if v is not None}
    if no_budgets:
        if changes or no_storage_quota:
            refuse("--no-budgets takes no other option.")
        changes = {"daily_budget_usd": None, "monthly_budget_usd": None}
    if no_storage_quota:
        if storage_quota_bytes is not None:
            refuse("--no-storage-quota and --storage-quota-bytes contradict each other.")
        changes["storage_quota_bytes"] = None
    with _admin_session() as session:
        update_limits(session, name, actor=CLI, **changes)
    console.print(f"[green]updated project '{name}'[/green]")


RetentionOption = Annotated[
    str | None,
    typer.Option(
        help="How long to keep them: 30d, 12h, 7d12h, 3600 (seconds), or 'forever'",
        show_default=False,
    ),
]


@projects_app.command("set-retention")
def projects_set_retention(
    name: str,
    images: RetentionOption = None,
    files: RetentionOption = None,
    jobs: RetentionOption = None,
) -> None:
    """Change how long a project keeps its images (with edit inputs), files and
    finished jobs' rows (only the ones given); the purge deletes what is past it."""
    from shared.audit.service import CLI
    from shared.core.errors import InvalidRequest
    from shared.retention.policy import parse_retention
    from shared.retention.service import set_retention

    given = {
        "image_retention_seconds": ("--images", images),
        "file_retention_seconds": ("--files", files),
        "job_retention_seconds": ("--jobs", jobs),
    }
    changes: dict[str, int | None] = {}
    for field, (option, text) in given.items():
        if text is None:
            continue
        try:
            changes[field] = parse_retention(text, what=option)
        except InvalidRequest as exc:
            refuse(str(exc))
    if not changes:
        refuse("Give --images, --files or --jobs.")
    with _admin_session() as session:
        project = set_retention(session, name, CLI, **changes)
        shown = {
            field: "forever" if (value := getattr(project, field)) is None else f"{value} s"
            for field in given
        }
    console.print(
        f"[green]updated project '{name}'[/green]: "
        + ", ".join(
            f"{field.removesuffix('_seconds').replace('_', ' ')} {value}"
            for field, value in shown.items()
        )
    )


@projects_app.command("list")
def projects_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line")] = False,
) -> None:
    """List projects and their limits."""
    from shared.projects.service import list_projects

    table = tables.table(
        "id",
        "name",
        "created",
        "requests/min/key",
        "images/day",
        "jobs in flight",
        "USD/day",
        "USD/month",
        "storage quota",
    )
    with _admin_session() as session:
        for p in list_projects(session):
            if as_json:
                limits = (
                    "key_requests_per_minute",
                    "images_per_day",
                    "jobs_in_flight",
                    "daily_budget_usd",
                    "monthly_budget_usd",
                    "storage_quota_bytes",
                    "image_retention_seconds",
                    "file_retention_seconds",
                    "job_retention_seconds",
                )
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
                _budget(p.daily_budget_usd),
                _budget(p.monthly_budget_usd),
                "none" if p.storage_quota_bytes is None else str(p.storage_quota_bytes),
            )
    if not as_json:
        Console().print(table)


def audit(
    project: Annotated[str | None, typer.Option(help="Only this project's events")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action (key.revoke)")] = None,
    since: Annotated[
        datetime | None,
        typer.Option(help="Only events at or after this UTC time (2026-12-06T10:00)"),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first", min=1)] = 50,
    after: Annotated[
        str | None, typer.Option(help="The previous page's last id: what came before it")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line")] = False,
) -> None:
    """The audit trail: admin actions (projects, keys, limits, budgets, quota,
    retention, deletions), who did them (admin, cli or a key's id) and when."""
    from datetime import UTC

    from shared.audit.service import list_events, project_names
    from shared.audit.views import event_view
    from shared.projects.service import get_project

    with _admin_session() as session:
        project_id = get_project(session, project).id if project is not None else None
        events, more = list_events(
            session,
            limit=limit,
            after=after,
            project_id=project_id,
            action=action,
            since=since.replace(tzinfo=UTC) if since is not None and not since.tzinfo else since,
        )
        names = project_names(session, events)
        for event in events:
            if as_json:
                print(event_view(event, names).model_dump_json())
                continue
            # One line an event, not a table: its ids (target, actor) stay whole on
            # an 80-column terminal, where seven columns cut them all (--json has
            # the details).
            project_name = names.get(event.project_id or "", "")
            print(
                f"{_when(event.at)}  {event.action:<16} {event.target}  by {event.actor}"
                + (f"  ({project_name})" if project_name else "")
            )
    if not as_json and more:
        console.print(f"more: --after {events[-1].id}")


def _when(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%d %H:%M") if value else None


def _limit(value: int | None) -> str:
    return "default" if value is None else ("unlimited" if value == 0 else str(value))


def _budget(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}"
