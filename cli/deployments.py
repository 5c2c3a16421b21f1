"""``imagegen deployments``: every deployment of every upstream model on a running
server, its weight, its declared limits and whether it is cooling down (``GET
/v1/admin/deployments``, with the admin key)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from cli import tables
from cli.client import BaseUrlOpt, JsonOpt, check, console

AdminKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-key",
        envvar="IMAGEGEN_ADMIN_API_KEY",
        help="The server's admin key (IMAGEGEN_ADMIN_API_KEY)",
    ),
]


def deployments(
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    admin_key: AdminKeyOpt = None,
) -> None:
    """Each upstream model's deployments: weight, limits, cooling down or healthy."""
    if not admin_key:
        console.print("[red]no admin key: pass --admin-key or set IMAGEGEN_ADMIN_API_KEY[/red]")
        raise typer.Exit(2)
    with connect_admin(base_url, admin_key) as client:
        page = check(client.get("/v1/admin/deployments"))
    if as_json:
        for row in page["data"]:
            print(json.dumps(row))
        return
    table = tables.table("model", "deployment", "weight", "images/min", "max concurrency", "health")
    for row in page["data"]:
        table.add_row(
            row["model"],
            row["deployment"],
            f"{row['weight']:g}",
            _limit(row.get("images_per_minute")),
            _limit(row.get("max_concurrency")),
            "cooling down" if row["cooling"] else "healthy",
        )
    Console().print(table)


def connect_admin(base_url: str, admin_key: str) -> httpx.Client:
    return httpx.Client(
        base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {admin_key}"}
    )


def _limit(value: Any) -> str:
    return "-" if value is None else str(value)
