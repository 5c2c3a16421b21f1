"""The house rules of ARCHITECTURE.md that a machine can check: which package may
import which, and that only the unit of work commits."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("jobs", "batches", "files", "webhooks", "traces", "projects")


def imports(package: str) -> list[tuple[str, str]]:
    found = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.append((str(path.relative_to(ROOT)), node.module))
            elif isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), a.name) for a in node.names]
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("shared", ("api", "worker", "cli")),
        ("api", ("worker", "cli")),
        ("worker", ("api", "cli")),
        ("shared/core", tuple(f"shared.{d}" for d in DOMAINS)),
    ],
)
def test_imports_point_down(package: str, forbidden: tuple[str, ...]) -> None:
    wrong = [
        (path, module)
        for path, module in imports(package)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]
    assert wrong == []


def test_only_the_unit_of_work_commits() -> None:
    commits = [
        str(path.relative_to(ROOT))
        for package in ("api", "worker", "shared", "cli")
        for path in (ROOT / package).rglob("*.py")
        if ".commit()" in path.read_text()
    ]
    assert commits == ["shared/core/db.py"]


def test_domain_services_open_no_transaction() -> None:
    """Services take the session; only the edges (a request, a worker step, a CLI
    command) open a unit of work. The one sender that does, after commit, is named."""
    opened = [
        str(path.relative_to(ROOT))
        for domain in DOMAINS
        for path in (ROOT / "shared" / domain).rglob("*.py")
        if "unit_of_work()" in path.read_text()
    ]
    assert opened == ["shared/jobs/service.py"]  # send_job: marks a refused publish


def test_only_the_local_provider_imports_torch() -> None:
    """The API and the workers of other queues stay light: torch, diffusers and
    transformers are imported by shared/providers/local alone (and lazily, by the
    provider lookup and a GPU worker's warm-up)."""
    heavy = ("torch", "diffusers", "transformers")
    offenders = [
        (path, module)
        for package in ("api", "worker", "shared", "cli")
        for path, module in imports(package)
        if module.split(".")[0] in heavy and not path.startswith("shared/providers/local/")
    ]
    assert offenders == []
    probe = (
        "import sys, api.app, worker.main, worker.tasks, cli.main, shared.providers;"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
