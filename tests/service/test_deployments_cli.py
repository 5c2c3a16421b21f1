"""``imagegen deployments`` (issue 26): the admin API's deployment health as the CLI
shows it, a table or one JSON object a line, over the in-process API."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

import cli.deployments
from cli.main import app
from tests.service.conftest import Service

ADMIN_KEY = "admin-service-key"


@pytest.fixture
def served(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's client is the in-process app's, with the key it was given."""
    monkeypatch.setattr(cli.deployments, "connect_admin", lambda _url, key: service.client(key))


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["deployments", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def _rows(out: str) -> dict[str, list[str]]:
    """The table's rows by deployment, split on blanks (the header's rule left out)."""
    header, _rule, *rows = [line.split() for line in out.splitlines() if line.strip()]
    assert header == ["model", "deployment", "weight", "images/min", "max", "concurrency", "health"]
    return {row[1]: row for row in rows}


def test_the_table_names_each_deployment_its_weight_limits_and_health(served: None) -> None:
    code, out, _ = run("--admin-key", ADMIN_KEY)
    assert code == 0
    rows = _rows(out)
    # The service's upstream models have no `deployments`: each is its own one.
    assert rows["dall-e-3"] == ["dall-e-3", "dall-e-3", "1", "-", "-", "healthy"]
    assert "procedural" not in rows  # not an upstream: no deployment


def test_a_cooling_deployment_and_declared_limits_are_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the API says (cooling needs Redis and several deployments: e2e shows it
    end to end, tests/e2e/test_routing.py), as the table renders it."""
    rows = [
        {
            "model": "spread",
            "deployment": "dep-a",
            "weight": 2.5,
            "images_per_minute": 50,
            "max_concurrency": 20,
            "cooling": True,
        },
        {"model": "spread", "deployment": "dep-b", "weight": 1.0, "cooling": False},
    ]
    page = {"object": "list", "data": rows, "has_more": False}

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/admin/deployments"
        assert request.headers["Authorization"] == f"Bearer {ADMIN_KEY}"
        return httpx.Response(200, json=page)

    monkeypatch.setattr(
        cli.deployments,
        "connect_admin",
        lambda url, key: httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            transport=httpx.MockTransport(answer),
        ),
    )
    code, out, _ = run("--admin-key", ADMIN_KEY)
    assert code == 0
    shown = _rows(out)
    assert shown["dep-a"] == ["spread", "dep-a", "2.5", "50", "20", "cooling", "down"]
    assert shown["dep-b"] == ["spread", "dep-b", "1", "-", "-", "healthy"]


def test_json_is_one_deployment_a_line(served: None) -> None:
    code, out, _ = run("--json", "--admin-key", ADMIN_KEY)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert {"model": "dall-e-3", "deployment": "dall-e-3", "weight": 1.0, "cooling": False} in [
        {k: row[k] for k in ("model", "deployment", "weight", "cooling")} for row in rows
    ]


def test_a_wrong_key_or_none_is_refused(served: None, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run("--admin-key", "not-the-admin-key")
    assert code == 1
    assert "401: This endpoint needs the admin API key." in err
    monkeypatch.delenv("IMAGEGEN_ADMIN_API_KEY", raising=False)
    code, _, err = run()
    assert code == 2
    assert "IMAGEGEN_ADMIN_API_KEY" in err
