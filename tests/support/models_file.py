"""More models for a test module: the running service's models file with entries
added, read by the registry until the module ends (then the file it had)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.core.settings import get_settings
from shared.registry import get_registry


@contextmanager
def models_added(
    folder: Path, entries: list[dict[str, Any]], env: dict[str, str] | None = None
) -> Iterator[None]:
    """The service's models and ``entries`` (written to ``folder``), with ``env``
    set (the entries' keys), while inside."""
    current = os.environ.get("IMAGEGEN_MODELS_FILE")
    models: list[dict[str, Any]] = []
    if current:
        models = (yaml.safe_load(Path(current).read_text()) or {}).get("models", [])
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [*models, *entries]}))
    patch = pytest.MonkeyPatch()
    patch.setenv("IMAGEGEN_MODELS_FILE", str(path))
    for name, value in (env or {}).items():
        patch.setenv(name, value)
    get_settings.cache_clear()
    get_registry.cache_clear()
    try:
        yield
    finally:
        patch.undo()
        get_settings.cache_clear()
        get_registry.cache_clear()
