"""docker-compose.yml names every service and variable the docs promise.

Docker cannot run here; this checks the file parses and is wired as documented.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from shared.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_has_every_service_with_healthchecks_and_ordering() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"migrate", "api", "io-worker", "redis", "postgres", "minio"} <= set(services)
    for name in ("api", "redis", "postgres", "minio"):
        assert "healthcheck" in services[name], name
    for name in ("api", "io-worker"):
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        for var in (
            "IMAGEGEN_DATABASE_URL",
            "IMAGEGEN_BROKER_URL",
            "IMAGEGEN_REDIS_URL",
            "IMAGEGEN_S3_ENDPOINT_URL",
            "IMAGEGEN_S3_BUCKET",
        ):
            assert var in env, (name, var)
    # Every service comes back after a crash or a host restart (a one-shot job
    # only on failure).
    for name, service in services.items():
        assert service.get("restart") == (
            "on-failure" if name in ("minio-init", "migrate") else "unless-stopped"
        ), name
    # The bucket exists before anything uses it.
    assert (
        services["api"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    )


def test_every_setting_and_compose_variable_is_documented() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for field in Settings.model_fields:
        assert f"IMAGEGEN_{field.upper()}" in reference, field
    compose = (ROOT / "docker-compose.yml").read_text()
    for var in set(re.findall(r"IMAGEGEN_[A-Z0-9_]+", compose)):
        assert var in reference, var


def test_readme_commands_match_ci() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test" in readme
    assert "bash scripts/test" in ci
    assert "imagegen dev" in readme


def test_the_image_copies_every_package_it_installs() -> None:
    """The Dockerfile copies each top-level package pyproject installs (a missing one
    builds fine and fails at `imagegen` start)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    dockerfile = (ROOT / "Dockerfile").read_text()
    missing = [p for p in packages if f"COPY {p} ./{p}" not in dockerfile]
    assert missing == []


def test_the_gpu_profile_runs_local_models_on_a_reserved_gpu_with_the_local_extra() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["command"][:4] == ["imagegen", "worker", "--queues", "gpu"]
    assert gpu["build"]["args"]["EXTRAS"] == "local"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # Every process that reads the registry sees the same models file.
    for name in ("api", "io-worker", "batch-worker", "webhook-worker", "gpu-worker"):
        assert any(v.endswith(":/models") or ":/models:" in v for v in services[name]["volumes"])
    # EXTRAS=local installs the lock with the local extra (tests/unit/test_lock.py).
    assert 'ARG EXTRAS=""' in (ROOT / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("diffusers") for dep in extras["local"])
