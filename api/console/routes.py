"""The console: a web page at ``/`` to look at the work (jobs with their images,
batches, a generate form, usage). One HTML shell and one script, served from this
package (no CDN, no build step); the script calls the same public API as any
client, with the key the user signs in with, kept in the browser's session
storage and sent in the Authorization header, never in a URL."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def console() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
