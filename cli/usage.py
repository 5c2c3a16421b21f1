"""``imagegen usage``: the project's usage on a running server, by day and model,
with what it cost."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

from cli import tables
from cli.client import BaseUrlOpt, JsonOpt, KeyOpt, check, connect


def usage(
    start_date: Annotated[
        str | None, typer.Option("--start", help="The first UTC day, YYYY-MM-DD")
    ] = None,
    end_date: Annotated[str | None, typer.Option("--end", help="The last UTC day")] = None,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Jobs, images and cost by UTC day and model (the last 30 days by default), then
    what the project (and the key, where it has its own) spent against its budgets
    today and this month, and the bytes it keeps stored now (against its quota)."""
    params: dict[str, Any] = {
        name: value
        for name, value in (("start_date", start_date), ("end_date", end_date))
        if value is not None
    }
    with connect(base_url, api_key) as client:
        report = check(client.get("/v1/usage", params=params))
    if as_json:
        print(json.dumps(report))
        return
    table = tables.table("day", "model", "jobs", "images", "cost (USD)")
    for row in report["data"]:
        table.add_row(
            row["date"],
            row["model"],
            str(sum(row["jobs"].values())),
            str(row["images"]),
            f"{row['cost_usd']:.4f}",
        )
    totals = report["totals"]
    table.add_row(
        "total", "", str(totals["jobs"]), str(totals["images"]), f"{totals['cost_usd']:.4f}"
    )
    Console().print(table)
    budgets = tables.table("budget", "period", "budget (USD)", "spent", "reserved", "remaining")
    for row in report.get("budgets", []):
        limit, remaining = row["budget_usd"], row["remaining_usd"]
        budgets.add_row(
            row["scope"],
            f"{row['period']} from {row['period_start']}",
            "none" if limit is None else f"{limit:.4f}",
            f"{row['spent_usd']:.4f}",
            f"{row['reserved_usd']:.4f}",
            "-" if remaining is None else f"{remaining:.4f}",
        )
    if report.get("budgets"):
        Console().print(budgets)
    storage = report.get("storage") or {}
    quota = report.get("storage_quota_bytes")
    print(
        f"stored: {report.get('storage_bytes', 0)} bytes"
        f" ({'no quota' if quota is None else f'quota {quota} bytes'}):"
        f" images {storage.get('images_bytes', 0)}, edit inputs {storage.get('inputs_bytes', 0)},"
        f" files {storage.get('files_bytes', 0)}"
    )
