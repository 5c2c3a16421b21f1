"""What the client commands (generate, batch, jobs) share: the key, the options
that name the server, a client that carries the key, and the check of an answer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

console = Console(stderr=True)

BaseUrlOpt = Annotated[str, typer.Option("--base-url", envvar="IMAGEGEN_URL")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="IMAGEGEN_API_KEY")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table or a line")]


def connect(base_url: str, api_key: str | None) -> httpx.Client:
    return httpx.Client(
        base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {resolve_key(api_key)}"}
    )


def check(resp: httpx.Response) -> dict[str, Any]:
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        console.print(f"[red]{resp.status_code}: {message}[/red]")
        raise typer.Exit(1)
    return dict(resp.json())


def cancel_at(path: str, as_json: bool, base_url: str, api_key: str | None) -> None:
    """POST a cancel; print the object (JSON) or its id and new status."""
    with connect(base_url, api_key) as client:
        obj = check(client.post(path))
    if as_json:
        print(json.dumps(obj))
    else:
        console.print(f"{obj['id']} {obj['status']}")


def delete_at(path: str, as_json: bool, base_url: str, api_key: str | None) -> None:
    """DELETE an object; print the answer (JSON) or its id and ``deleted``."""
    with connect(base_url, api_key) as client:
        obj = check(client.delete(path))
    if as_json:
        print(json.dumps(obj))
    else:
        console.print(f"{obj['id']} deleted")


def resolve_key(api_key: str | None) -> str:
    """--api-key, IMAGEGEN_API_KEY, IMAGEGEN_DEV_API_KEY, or the dev server's key file."""
    key = api_key or os.environ.get("IMAGEGEN_DEV_API_KEY")
    if not key:
        key_file = Path(os.environ.get("IMAGEGEN_DATA_DIR", ".imagegen")) / "dev_api_key"
        key = key_file.read_text().strip() if key_file.exists() else None
    if not key:
        console.print("[red]no API key: pass --api-key or set IMAGEGEN_API_KEY[/red]")
        raise typer.Exit(2)
    return key
