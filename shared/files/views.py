
from __future__ import annotations

from typing import Any

from shared.core.clock import to_unix
from shared.files.models import File


def file_view(file: File) -> dict[str, Any]:
    return {"id": file.id, "object": "file", "bytes": file.bytes,
            "created_at": to_unix(file.created_at), "filename": file.filename,
            "purpose": file.purpose, "status": "processed", "expires_at": None,
            "status_details": None}
