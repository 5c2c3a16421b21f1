"""The house rules of ARCHITECTURE.md that a machine can check: which package may
import which, and that only the unit of work commits."""

from __future__ import annotations

import ast
import re
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


# The one module that writes a job's row: every move of its state machine.
LIFECYCLE = "shared/jobs/lifecycle.py"
# Assignments to a job's ``status`` outside it that write no row, each with its reason.
IN_MEMORY_ONLY = {
    # Reply.apply: the API's detached copy of a job (inserted by a Core statement,
    # never in a session) brought to the end the worker recorded, to answer from.
    "shared/jobs/replies.py",
}


def _job_table_refs(tree: ast.AST) -> set[str]:
    """Names bound to the job table in a module (``_JOBS = table(Job)``)."""
    names = {"Job"}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "table"
            and _names_job(node.value.args[0] if node.value.args else None, names)
        ):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _names_job(node: ast.AST | None, refs: set[str]) -> bool:
    """``Job``, an alias of its table, ``table(Job)`` or ``Job.__table__``."""
    if isinstance(node, ast.Name):
        return node.id in refs
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "table":
        return bool(node.args) and _names_job(node.args[0], refs)
    if isinstance(node, ast.Attribute) and node.attr == "__table__":
        return _names_job(node.value, refs)
    return False


def _is_job_object(node: ast.AST) -> bool:
    """``job``, ``self.job``, ``result.job``, ``queued_job``...: by name, a Job."""
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return "job" in name.lower()


def job_writes(path: Path) -> list[str]:
    """Each place in ``path`` that writes a job's row: an INSERT or UPDATE of the job
    table, a ``.values(...)`` setting a ``JobStatus``, an UPDATE of it in raw SQL,
    or an assignment (``job.status = ...``, ``setattr(job, ...)``) that a session
    would flush. Reads and filters (``col(Job.status) == ...``) are not writes."""
    source = path.read_text()
    tree = ast.parse(source)
    refs = _job_table_refs(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("update", "insert") and node.args and _names_job(node.args[0], refs):
                found.append((line, f"{name}({ast.unparse(node.args[0])})"))
            elif name == "values":
                found += [
                    (line, f".values({k.arg}={ast.unparse(k.value)})")
                    for k in node.keywords
                    if isinstance(k.value, ast.Attribute)
                    and isinstance(k.value.value, ast.Name)
                    and k.value.value.id == "JobStatus"
                ]
            elif name == "setattr" and node.args and _is_job_object(node.args[0]):
                found.append((line, ast.unparse(node)))
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr == "status"
                    and _is_job_object(target.value)
                ):
                    found.append((line, f"{ast.unparse(target)} = ..."))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.search(r"\b(update|insert\s+into)\s+job\b", node.value, re.IGNORECASE)
        ):
            found.append((line, f"raw SQL {node.value[:40]!r}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_only_the_lifecycle_writes_a_job() -> None:
    """A job moves (queued, running, its end, canceled, re-queued) and its row is
    written only by shared/jobs/lifecycle.py, each move an UPDATE guarded by the
    statuses TRANSITIONS lets it come from."""
    writes = {
        rel: found
        for package in ("api", "worker", "shared", "cli")
        for path in sorted((ROOT / package).rglob("*.py"))
        if (rel := str(path.relative_to(ROOT))) != LIFECYCLE
        and (found := job_writes(path))
        and rel not in IN_MEMORY_ONLY
    }
    assert writes == {}
    assert job_writes(ROOT / LIFECYCLE), "the rule no longer sees the lifecycle's writes"
    for rel in IN_MEMORY_ONLY:
        assert job_writes(ROOT / rel), f"{rel} is no longer an exception: drop it"


def test_the_job_write_rule_sees_writes_and_not_reads(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "_JOBS = table(Job)\n"
        "a = sa.select(Job).where(col(Job.status) == JobStatus.queued)\n"  # a read
        "b = sa.update(Batch).values(status=BatchStatus.expiring)\n"  # another table
        "c = sa.update(_JOBS).where(_JOBS.c.id == 1)\n"
        "d = sa.update(Job).values(attempts=1)\n"
        "e = sa.insert(table(Job))\n"
        "f = stmt.values(status=JobStatus.canceled)\n"
        "job.status = JobStatus.failed\n"
        "setattr(result.job, 'status', 'x')\n"
        "g = sa.text('UPDATE job SET status = 1')\n"
        "batch.status = BatchStatus.expiring\n"
    )
    assert [w.split(":")[0] for w in job_writes(source)] == ["4", "5", "6", "7", "8", "9", "10"]


def test_connections_clients_and_storage_are_made_by_the_context() -> None:
    """No ``lru_cache`` getter of a connection, a client, a pool or the storage: a
    process makes them in its context at start (shared/core/context.py), where a
    test makes its own. What is cached is plain data and what is computed from it."""
    cached = sorted(
        f"{path.relative_to(ROOT)}:{node.name}"
        for package in ("api", "worker", "shared", "cli")
        for path in (ROOT / package).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
        and any("cache" in ast.unparse(d) for d in node.decorator_list)
    )
    assert cached == [
        "shared/core/settings.py:get_settings",  # the environment, read once
        "shared/jobs/lifecycle.py:_end_statement",  # a statement per shape
        "shared/projects/limits.py:_count_script",  # a script registered per client
        "shared/providers/procedural.py:_ramp",  # a gradient per size
        "shared/registry/__init__.py:get_registry",  # the models file, read once
        "shared/registry/workflows.py:_read",  # a comfyui workflow file, read once
    ]
