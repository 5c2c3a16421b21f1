"""e2e fixtures: the shared stack lives in tests/conftest.py."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import requests


@pytest.fixture(scope="module", autouse=True)
def _collect_at_module_end() -> Iterator[None]:
    """A client left open (an unclosed socket is a ResourceWarning, an error here)
    fails in the module that leaked it, not in whichever later test the garbage
    collector happens to run in."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    """One connection pool for every Schemathesis case of a module, closed at its end
    (Schemathesis would otherwise open a session per call and leave its sockets to
    the collector)."""
    with requests.Session() as session:
        yield session
