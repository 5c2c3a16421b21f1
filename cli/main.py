"""The ``imagegen`` command line: the root group, the registration of each
subcommand, and the entry point. ``cli`` is the composition root, the only package
that imports both ``api`` and ``worker`` (cli/servers.py, once a server command
runs: client commands import neither)."""

from __future__ import annotations

import sys
from typing import Annotated

import httpx
import typer
from rich.console import Console

from cli.admin import audit, keys_app, migrate, projects_app
from cli.batch import batch_app
from cli.deployments import deployments
from cli.generate import generate
from cli.help import name_values
from cli.jobs import jobs_app
from cli.servers import api, dev, worker
from cli.usage import usage

app = typer.Typer(
    help="imagegen: image generation with an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: no boxes, and no "<bool>" beside flags (click's own layout).
    rich_markup_mode=None,
)
# Help lists the commands in this order, then the groups in theirs.
app.command()(migrate)
app.command()(api)
app.command()(worker)
app.command()(dev)
app.command()(generate)
app.command()(usage)
app.command()(deployments)
app.command()(audit)
app.add_typer(keys_app, name="keys")
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


def main() -> None:
    """Entry point: errors the user can act on print as one line, not a traceback."""
    from shared.core.errors import ImagegenError
    from shared.core.redact import install

    install()  # before anything logs: no secret in any line of this process
    _enable_metrics()
    command = typer.main.get_command(app)
    name_values(command)
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
