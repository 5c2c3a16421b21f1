"""The lock files install what pyproject.toml asks for, the same versions everywhere,
every file checked by its hash (scripts/lock writes them, scripts/install and the
Dockerfile install them)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?: ; ([^\\]+?))? \\$")


def pins(lock: str) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, its sha256 hashes), from a requirements-format lock."""
    found: dict[str, tuple[Version, list[str]]] = {}
    name = ""
    for line in (LOCKS / lock).read_text().splitlines():
        if match := _ENTRY.match(line):
            name = str(canonicalize_name(match[1]))
            found[name] = (Version(match[2]), [])
        elif line.strip().startswith("--hash=sha256:"):
            found[name][1].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
    return found


def declared(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(d) for d in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(d) for d in project["optional-dependencies"][extra]]
    return wanted


def test_the_installer_lock_holds_every_platforms_wheel_by_hash() -> None:
    [(name, (version, hashes))] = pins("uv.txt").items()
    assert name == "uv"
    assert len(hashes) > 10, "uv.txt lost the other platforms' wheels"
    assert version.major == 0


@pytest.mark.parametrize(
    ("lock", "extras"),
    [("runtime.txt", ()), ("test.txt", ("test", "local")), ("gpu.txt", ("local",))],
)
def test_each_lock_pins_every_declared_dependency_inside_its_range(
    lock: str, extras: tuple[str, ...]
) -> None:
    locked = pins(lock)
    for requirement in declared(*extras):
        name = str(canonicalize_name(requirement.name))
        assert name in locked, f"{lock} lacks {name}"
        version = locked[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (lock, name, version)
        assert locked[name][1], f"{lock}: {name} has no hash (pip --require-hashes refuses it)"
    for name, (_, hashes) in locked.items():
        assert hashes, f"{lock}: {name} has no hash"


@pytest.mark.parametrize("lock", ["runtime.txt", "gpu.txt"])
def test_the_service_and_gpu_locks_run_the_versions_the_tests_ran(lock: str) -> None:
    tested = pins("test.txt")
    for name, (version, _) in pins(lock).items():
        if name in tested:
            # gpu.txt takes PyPI's torch (the CUDA build) of the release tested on the
            # CPU build: 2.13.0 against 2.13.0+cpu.
            assert version.public == tested[name][0].public, (lock, name)


def test_gates_are_pinned_by_the_lock() -> None:
    tested = pins("test.txt")
    assert {"ruff", "mypy", "pytest"} <= set(tested)
    # The installer is locked too, in a venv of its own (never one it installs into).
    assert "uv" in pins("uv.txt")
    assert "uv" not in tested
    # The tests run PyTorch's CPU build: PyPI's Linux build drags several GB of CUDA.
    assert tested["torch"][0].local == "cpu"
    assert not any(name.startswith("nvidia-") for name in tested)


def test_every_install_path_uses_a_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes --no-deps" in dockerfile
    assert 'requirements/$([ "$EXTRAS" = local ] && echo gpu || echo runtime).txt' in dockerfile
    install = (ROOT / "scripts" / "install").read_text()
    assert "pip sync -q --python .venv/bin/python --require-hashes --compile-bytecode" in install
    assert "--require-hashes --no-deps -r requirements/uv.txt" in install
    assert "bash scripts/install test" in (ROOT / "scripts" / "test").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/install && .venv/bin/imagegen dev" in readme
