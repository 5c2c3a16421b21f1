"""``imagegen batch submit|status|download``: bulk generation from the command line."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli import tables
from cli.client import BaseUrlOpt, JsonOpt, KeyOpt, cancel_at, check, connect, delete_at

batch_app = typer.Typer(
    help="Bulk generation: submit, follow and download batches.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
console = Console(stderr=True)
TERMINAL = ("completed", "failed", "expired", "cancelled")


def follow(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    """A live progress bar (done/failed/total, rate, ETA) until the batch ends."""
    batch = check(client.get(f"/v1/batches/{batch_id}"))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[done]} done, {task.fields[failed]} failed / {task.total:.0f}"),
        TextColumn("{task.fields[rate]:.1f}/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        counts = batch["request_counts"]
        task = progress.add_task(
            batch["status"], total=max(1, counts["total"]), done=0, failed=0, rate=0.0
        )
        started = time.monotonic()
        while True:
            counts = batch["request_counts"]
            finished = counts["completed"] + counts["failed"]
            elapsed = max(1e-6, time.monotonic() - started)
            progress.update(
                task,
                description=batch["status"],
                total=max(1, counts["total"]),
                completed=finished,
                done=counts["completed"],
                failed=counts["failed"],
                rate=finished / elapsed,
            )
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(0.5)
            batch = check(client.get(f"/v1/batches/{batch_id}"))


@batch_app.command("submit")
def submit(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The file")
    ],
    model: Annotated[str | None, typer.Option(help="For .txt files")] = None,
    size: Annotated[str | None, typer.Option(help="For .txt files")] = None,
    n: Annotated[int | None, typer.Option(help="For .txt files")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow until it ends")] = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Submit a .jsonl in OpenAI's batch format, or a .txt of one prompt per line."""
    with connect(base_url, api_key) as client:
        if path.suffix == ".txt":
            prompts = [p for p in path.read_text().splitlines() if p.strip()]
            shared = {
                k: v for k, v in {"model": model, "size": size, "n": n}.items() if v is not None
            }
            # Each line's custom_id names it after its prompt: `batch download` saves
            # 0001-a-red-fox-0.png, not request-1-0.png.
            requests = [
                {"custom_id": f"{i:04d}-{_slug(p)}", "prompt": p, **shared}
                for i, p in enumerate(prompts, start=1)
            ]
            batch = check(client.post("/v1/images/batches", json={"requests": requests}))
        else:
            with path.open("rb") as fh:
                file = check(
                    client.post(
                        "/v1/files", data={"purpose": "batch"}, files={"file": (path.name, fh)}
                    )
                )
            batch = check(
                client.post(
                    "/v1/batches",
                    json={
                        "input_file_id": file["id"],
                        "endpoint": "/v1/images/generations",
                        "completion_window": "24h",
                    },
                )
            )
        print(batch["id"])
        if wait:
            _report(client, follow(client, batch["id"]))


@batch_app.command("status")
def status(
    batch_id: str,
    wait: Annotated[bool, typer.Option("--wait", help="Follow until it ends")] = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Show a batch (as JSON), or follow it with --wait (exit 1 if nothing succeeded)."""
    with connect(base_url, api_key) as client:
        batch = follow(client, batch_id) if wait else check(client.get(f"/v1/batches/{batch_id}"))
        print(json.dumps(batch, indent=2))
        if wait:
            _report(client, batch)


@batch_app.command("list")
def list_batches(
    limit: Annotated[int, typer.Option("--limit", "-l", help="At most this many")] = 20,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """The project's batches, newest first."""
    with connect(base_url, api_key) as client:
        page = check(client.get("/v1/batches", params={"limit": limit}))
    if as_json:
        for batch in page["data"]:
            print(json.dumps(batch))
        return
    table = tables.table("id", "status", "endpoint", "done", "failed", "total")
    for b in page["data"]:
        c = b["request_counts"]
        table.add_row(
            b["id"],
            b["status"],
            b["endpoint"],
            str(c["completed"]),
            str(c["failed"]),
            str(c["total"]),
        )
    Console().print(table)


@batch_app.command("cancel")
def cancel(
    batch_id: str,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Cancel a batch: pending lines never run; it ends `cancelled` once none runs."""
    cancel_at(f"/v1/batches/{batch_id}/cancel", as_json, base_url, api_key)


@batch_app.command("delete")
def delete(
    batch_id: str,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Delete an ended batch: its jobs' images and its output and error files."""
    delete_at(f"/v1/batches/{batch_id}", as_json, base_url, api_key)


def _report(client: httpx.Client, batch: dict[str, Any]) -> None:
    """The batch's end in one line; when nothing succeeded, its first reasons, and a
    non-zero exit (a script must not take an all-failed batch for a done one)."""
    c = batch["request_counts"]
    colour = "green" if batch["status"] == "completed" else "yellow"
    console.print(
        f"[{colour}]{batch['id']} {batch['status']}: {c['completed']} done, "
        f"{c['failed']} failed of {c['total']}[/{colour}]"
    )
    if c["completed"] or not (c["failed"] or batch["status"] == "failed"):
        return
    for reason in _first_reasons(client, batch):
        console.print(f"[red]  {reason}[/red]", highlight=False)
    raise typer.Exit(1)


def _first_reasons(client: httpx.Client, batch: dict[str, Any], most: int = 3) -> list[str]:
    errors = (batch.get("errors") or {}).get("data") or []
    reasons = [f"line {e.get('line')}: {e.get('message')}" for e in errors[:most]]
    if not reasons and batch.get("error_file_id"):
        text = _check_text(client.get(f"/v1/files/{batch['error_file_id']}/content"))
        for line in text.splitlines()[:most]:
            row = json.loads(line)
            body = (row.get("response") or {}).get("body") or {}
            message = (body.get("error") or row.get("error") or {}).get("message", "")
            reasons.append(f"{row.get('custom_id')}: {message}")
    return reasons


def _check_text(resp: httpx.Response) -> str:
    if resp.status_code >= 400:
        check(resp)
    return resp.text


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:150] or "item"


@batch_app.command("download")
def download(
    batch_id: str,
    out: Annotated[Path, typer.Option(help="Directory")] = Path("."),
    base_url: BaseUrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Save the images (named by custom_id), the output and error JSONL files, and
    <batch>_images.jsonl: each image's file with its custom_id, line and prompt."""
    out.mkdir(parents=True, exist_ok=True)
    with connect(base_url, api_key) as client:
        batch = check(client.get(f"/v1/batches/{batch_id}"))
        if batch["status"] not in TERMINAL:
            console.print(f"[yellow]batch is {batch['status']}; try again when it ends[/yellow]")
            raise typer.Exit(1)
        lines = _lines(client, batch_id)
        saved: list[list[dict[str, Any]]] = []
        for kind in ("output", "error"):
            file_id = batch.get(f"{kind}_file_id")
            if not file_id:
                continue
            resp = client.get(f"/v1/files/{file_id}/content")
            resp.raise_for_status()
            (out / f"{batch_id}_{kind}.jsonl").write_bytes(resp.content)
            if kind == "output":
                saved += [_save(out, json.loads(text), lines) for text in resp.text.splitlines()]
    images = [image for row in saved for image in row]
    (out / f"{batch_id}_images.jsonl").write_text("".join(json.dumps(i) + "\n" for i in images))
    console.print(f"[green]{len(images)} image(s) and the result files in {out}[/green]")


def _lines(client: httpx.Client, batch_id: str) -> dict[str, dict[str, Any]]:
    """Each line's number and prompt by custom_id (the output file has neither)."""
    lines: dict[str, dict[str, Any]] = {}
    after: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000, **({"after": after} if after else {})}
        page = check(client.get(f"/v1/images/batches/{batch_id}/items", params=params))
        for item in page["data"]:
            lines[item["custom_id"]] = {"line": item["line"], "prompt": item.get("prompt")}
        if not page["has_more"]:
            return lines
        after = page["last_line"]


def _save(out: Path, row: dict[str, Any], lines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One output line's images, written as <custom_id>-<index>.<ext>; what was saved."""
    body = row["response"]["body"]
    ext = body.get("output_format") or "png"
    saved = []
    for index, item in enumerate(body["data"]):
        data = (
            base64.b64decode(item["b64_json"])
            if item.get("b64_json")
            else httpx.get(item["url"], timeout=60).raise_for_status().content
        )
        name = f"{_safe(row['custom_id'])}-{index}.{ext}"
        (out / name).write_bytes(data)
        saved.append(
            {
                "file": name,
                "custom_id": row["custom_id"],
                **lines.get(row["custom_id"], {}),
                "index": index,
                **(
                    {"revised_prompt": item["revised_prompt"]} if item.get("revised_prompt") else {}
                ),
            }
        )
    return saved
