"""``imagegen generate``: submit async, follow the job's server-sent events,
download the images."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from cli.client import resolve_key

console = Console(stderr=True)


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
    cancel_after: Annotated[
        str | None,
        typer.Option(help="A deadline such as 30s or 5m: not done by then, it is canceled"),
    ] = None,
) -> None:
    """Generate images on a running server and save them to OUT."""
    key = resolve_key(api_key)
    started = time.monotonic()
    paths = generate_images(
        base_url,
        key,
        prompt,
        model=model,
        size=size,
        n=n,
        out=out,
        console=console,
        cancel_after=cancel_after,
    )
    seconds = round(time.monotonic() - started, 3)
    if as_json:
        print(json.dumps({"files": [str(p) for p in paths], "seconds": seconds}))
        return
    for path in paths:
        print(path)
    console.print(f"[green]{len(paths)} image(s) in {seconds:.1f}s[/green]")


def follow(client: httpx.Client, job_id: str, console: Console) -> dict[str, Any]:
    """Show each change from ``/events`` until the job ends; returns the final job."""
    job: dict[str, Any] = {"id": job_id, "status": "queued"}
    with (
        console.status(f"job {job_id}: queued") as status,
        client.stream("GET", f"/v1/images/jobs/{job_id}/events", timeout=None) as resp,
    ):
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            job = json.loads(line[len("data: ") :])
            where = f", {job['queue_position']} in queue" if job.get("queue_position") else ""
            status.update(f"job {job_id}: {job['status']}{where}")
    return job


def generate_images(
    base_url: str,
    key: str,
    prompt: str,
    *,
    model: str | None,
    size: str | None,
    n: int,
    out: Path,
    console: Console,
    cancel_after: str | None = None,
) -> list[Path]:
    body: dict[str, Any] = {"prompt": prompt, "n": n}
    if model:
        body["model"] = model
    if size:
        body["size"] = size
    headers = {"Authorization": f"Bearer {key}", "Prefer": "respond-async"}
    if cancel_after:
        headers["Cancel-After"] = cancel_after
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        resp = client.post("/v1/images/generations", json=body)
        if resp.status_code >= 400:
            console.print(f"[red]{resp.status_code}: {resp.json()['error']['message']}[/red]")
            raise typer.Exit(1)
        job = follow(client, resp.json()["id"], console)
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            console.print(f"[red]job {job['status']}: {err.get('message', '')}[/red]")
            raise typer.Exit(1)
        out.mkdir(parents=True, exist_ok=True)
        ext = job["request"].get("output_format", "png")
        paths = []
        for index, item in enumerate(job["result"]["data"]):
            # Presigned S3 URLs must not carry our Authorization header: plain GET.
            data = (
                base64.b64decode(item["b64_json"])
                if item.get("b64_json")
                else httpx.get(item["url"], timeout=60).raise_for_status().content
            )
            path = out / f"{job['id']}-{index}.{ext}"
            path.write_bytes(data)
            paths.append(path)
        return paths
