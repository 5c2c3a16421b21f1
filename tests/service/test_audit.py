"""The audit trail (issue 29): every admin action, over the admin API and the CLI,
leaves exactly one event naming who (admin, cli), what and which target, with no
secret in it; read back through ``GET /v1/admin/audit`` (filters, pages) and
``imagegen audit``. A refused action leaves none (the event is in its transaction)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import shared.projects.service
from cli.main import app
from shared.core.ids import new_id
from shared.core.settings import get_settings
from tests.service.conftest import BASE_URL, Service

ADMIN = {"Authorization": "Bearer admin-service-key"}


@pytest.fixture
def admin(service: Service, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """The admin API. Limits and budgets are refused without Redis (they are counted
    there); the service tier has none, so the check is told one is configured: what
    is under test is the trail, not the counting (tests/e2e/test_keys_and_limits.py)."""
    with_redis = get_settings().model_copy(update={"redis_url": "redis://127.0.0.1:9/0"})
    monkeypatch.setattr(shared.projects.service, "get_settings", lambda: with_redis)
    return TestClient(service.app, base_url=BASE_URL, headers=ADMIN)


def _events(admin: TestClient, **params: Any) -> list[dict[str, Any]]:
    resp = admin.get("/v1/admin/audit", params={"limit": 100, **params})
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def test_each_admin_api_action_leaves_one_event_without_secrets(admin: TestClient) -> None:
    name = new_id("audited")
    made = admin.post("/v1/admin/projects", json={"name": name, "jobs_in_flight": 3})
    assert made.status_code == 200
    project_id = made.json()["id"]
    assert admin.post("/v1/admin/projects", json={"name": name}).status_code == 409
    patched = admin.patch(
        f"/v1/admin/projects/{name}",
        json={"images_per_day": 50, "daily_budget_usd": 2.5, "storage_quota_bytes": 10_000},
    )
    assert patched.status_code == 200
    assert patched.json()["storage_quota_bytes"] == 10_000
    key = admin.post("/v1/admin/keys", json={"project": name, "name": "ci", "user": "erin"})
    secret = key.json()["key"]
    key_id = key.json()["id"]
    assert admin.post(f"/v1/admin/keys/{key_id}/revoke").status_code == 200

    events = _events(admin, project=name)
    assert [(e["action"], e["target"], e["actor"]) for e in reversed(events)] == [
        ("project.create", project_id, "admin"),
        ("budget.update", project_id, "admin"),
        ("limits.update", project_id, "admin"),
        ("quota.update", project_id, "admin"),
        ("key.create", key_id, "admin"),
        ("key.revoke", key_id, "admin"),
    ]
    by_action = {e["action"]: e for e in events}
    assert by_action["project.create"]["details"] == {"name": name, "jobs_in_flight": 3}
    assert by_action["limits.update"]["details"]["changes"] == {
        "images_per_day": {"from": None, "to": 50}
    }
    assert by_action["budget.update"]["details"]["changes"] == {
        "daily_budget_usd": {"from": None, "to": 2.5}
    }
    assert by_action["quota.update"]["details"]["changes"] == {
        "storage_quota_bytes": {"from": None, "to": 10_000}
    }
    created = by_action["key.create"]["details"]
    assert created["project"] == name
    assert created["name"] == "ci"
    assert created["project_created"] is False
    assert created["prefix"] == key.json()["prefix"]  # how an admin tells keys apart
    assert all(e["project"] == name and e["project_id"] == project_id for e in events)
    # The secret is nowhere in the trail, whole or as its random part.
    trail = json.dumps(_events(admin))
    assert secret not in trail
    assert secret[6:] not in trail
    # Every event is on the clock: a filter by time keeps them, one after them none.
    assert len(_events(admin, project=name, since=by_action["project.create"]["at"])) == 6
    assert _events(admin, project=name, since=by_action["key.revoke"]["at"] + 2) == []


def test_the_list_filters_by_action_and_pages_newest_first(admin: TestClient) -> None:
    name = new_id("paged")
    admin.post("/v1/admin/projects", json={"name": name})
    for quota in (1, 2, 3):
        admin.patch(f"/v1/admin/projects/{name}", json={"storage_quota_bytes": quota})
    quotas = _events(admin, project=name, action="quota.update")
    assert [e["details"]["changes"]["storage_quota_bytes"]["to"] for e in quotas] == [3, 2, 1]
    first = admin.get("/v1/admin/audit", params={"project": name, "limit": 2}).json()
    assert first["has_more"] is True
    assert len(first["data"]) == 2
    rest = admin.get(
        "/v1/admin/audit", params={"project": name, "limit": 2, "after": first["last_id"]}
    ).json()
    assert rest["has_more"] is False
    assert [e["action"] for e in first["data"] + rest["data"]] == [
        "quota.update",
        "quota.update",
        "quota.update",
        "project.create",
    ]


def test_a_key_for_a_new_project_is_one_event_saying_so(admin: TestClient) -> None:
    name = new_id("implicit")
    key = admin.post("/v1/admin/keys", json={"project": name}).json()
    events = _events(admin, project=name)
    assert [(e["action"], e["target"]) for e in events] == [("key.create", key["id"])]
    assert events[0]["details"]["project_created"] is True


def test_the_trail_needs_the_admin_key_and_says_bad_filters(
    service: Service, admin: TestClient
) -> None:
    assert service.client().get("/v1/admin/audit").status_code == 401
    missing = admin.get("/v1/admin/audit", params={"project": "no-such-project"})
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "project"
    bad = admin.get("/v1/admin/audit", params={"since": "yesterday"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "since"


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def test_cli_admin_commands_are_audited_as_cli_and_listed(
    service: Service, admin: TestClient
) -> None:
    name = new_id("clied")
    _cli("projects", "create", name, "--storage-quota-bytes", "500")
    _cli("projects", "set-limits", name, "--no-storage-quota")
    secret = _cli("keys", "create", "--project", name).strip().splitlines()[-1]
    key_id = next(e["target"] for e in _events(admin, project=name) if e["action"] == "key.create")
    _cli("keys", "revoke", key_id)
    lines = _cli("audit", "--project", name, "--json").splitlines()
    events = [json.loads(line) for line in lines]
    assert [(e["action"], e["actor"]) for e in reversed(events)] == [
        ("project.create", "cli"),
        ("quota.update", "cli"),
        ("key.create", "cli"),
        ("key.revoke", "cli"),
    ]
    assert events[2]["details"]["changes"] == {"storage_quota_bytes": {"from": 500, "to": None}}
    assert secret.startswith("sk-ig-")
    assert secret not in "\n".join(lines)
    since = _cli("audit", "--project", name, "--since", "2000-01-01T00:00", "--json")
    assert since.splitlines() == lines
    assert _cli("audit", "--project", name, "--since", "2999-01-01", "--json") == ""
    table = _cli("audit", "--project", name, "--action", "key.revoke")
    (line,) = table.splitlines()  # one line an event, its ids whole
    assert "key.revoke" in line
    assert key_id in line
    assert "by cli" in line
    assert "project.create" not in table
