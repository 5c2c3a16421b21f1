"""``imagegen jobs list|get|cancel|delete|watch``: the project's jobs on a running
server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console

from cli import tables
from cli.client import BaseUrlOpt, JsonOpt, KeyOpt, cancel_at, check, connect, delete_at

jobs_app = typer.Typer(
    help="Jobs: list, show, cancel, delete, follow.", no_args_is_help=True, rich_markup_mode=None
)
console = Console(stderr=True)


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@jobs_app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status")] = None,
    limit: Annotated[int, typer.Option("--limit", "-l", help="At most this many")] = 20,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """The project's jobs, newest first."""
    params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
    with connect(base_url, api_key) as client:
        page = check(client.get("/v1/images/jobs", params=params))
    if as_json:
        for job in page["data"]:
            print(json.dumps(job))
        return
    table = tables.table("id", "status", "model", "created", "finished", "error")
    for job in page["data"]:
        error = (job.get("error") or {}).get("code", "")
        table.add_row(
            job["id"],
            job["status"],
            job["model"],
            _when(job.get("created_at")),
            _when(job.get("finished_at")),
            error,
        )
    Console().print(table)


@jobs_app.command("get")
def get_job(
    job_id: str, base_url: BaseUrlOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None
) -> None:
    """One job, as JSON (its result with fresh image URLs)."""
    with connect(base_url, api_key) as client:
        print(json.dumps(check(client.get(f"/v1/images/jobs/{job_id}")), indent=2))


@jobs_app.command("cancel")
def cancel_job(
    job_id: str,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Cancel a queued or running job."""
    cancel_at(f"/v1/images/jobs/{job_id}/cancel", as_json, base_url, api_key)


@jobs_app.command("delete")
def delete_job(
    job_id: str,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Delete a job and its images (canceled first if it has not finished)."""
    delete_at(f"/v1/images/jobs/{job_id}", as_json, base_url, api_key)


@jobs_app.command("watch")
def watch_job(
    job_id: str,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Follow a job's events (status, progress) until it ends; exit 1 unless it
    succeeded. With --json, each event is a line {"event": ..., "job": ...}."""
    last: dict[str, Any] = {}
    with (
        connect(base_url, api_key) as client,
        client.stream("GET", f"/v1/images/jobs/{job_id}/events", timeout=None) as resp,
    ):
        if resp.status_code >= 400:
            resp.read()
            check(resp)
        event = ""
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                last = json.loads(line.removeprefix("data: "))
                if as_json:
                    print(json.dumps({"event": event, "job": last}), flush=True)
                    continue
                step = last.get("progress")
                detail = f" step {step['step']}/{step['steps']}" if step else ""
                console.print(f"{event}{detail}")
    if last.get("status") != "succeeded":
        error = last.get("error") or {}
        if as_json:
            raise typer.Exit(1)
        console.print(f"[red]{last.get('status')}: {error.get('message', '')}[/red]")
        raise typer.Exit(1)
    if as_json:
        return
    for item in (last.get("result") or {}).get("data", []):
        print(item.get("url") or "(b64_json)")
