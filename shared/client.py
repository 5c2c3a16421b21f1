"""A small HTTP client for ``imagegen generate``: submit async, follow, download."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console


def generate_images(base_url: str, key: str, prompt: str, *, model: str | None,
                    size: str | None, n: int, out: Path, console: Console) -> list[Path]:
    body: dict[str, Any] = {"prompt": prompt, "n": n}
    if model:
        body["model"] = model
    if size:
        body["size"] = size
    headers = {"Authorization": f"Bearer {key}", "Prefer": "respond-async"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        resp = client.post("/v1/images/generations", json=body)
        if resp.status_code >= 400:
            console.print(f"[red]{resp.status_code}: {resp.json()['error']['message']}[/red]")
            raise typer.Exit(1)
        job = resp.json()
        with console.status(f"job {job['id']}: {job['status']}") as status:
            while job["status"] in ("queued", "running"):
                time.sleep(0.5)
                job = client.get(f"/v1/images/jobs/{job['id']}").json()
                status.update(f"job {job['id']}: {job['status']} (attempt {job['attempts']})")
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            console.print(f"[red]job {job['status']}: {err.get('message', '')}[/red]")
            raise typer.Exit(1)
        out.mkdir(parents=True, exist_ok=True)
        ext = job["request"].get("output_format", "png")
        paths = []
        for index, item in enumerate(job["result"]["data"]):
            data = (base64.b64decode(item["b64_json"]) if item.get("b64_json")
                    else httpx.get(item["url"], timeout=60).raise_for_status().content)
            path = out / f"{job['id']}-{index}.{ext}"
            path.write_bytes(data)
            paths.append(path)
        return paths
