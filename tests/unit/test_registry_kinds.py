"""Remote kinds in the registry (issue 27): each kind's own fields, refused on
the others, a kind's required fields, and every kind backed by a provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.registry import RegistryError, load_registry

CAPS = {"sizes": ["1024x1024"], "max_n": 1}


def _load(tmp_path: Path, entry: dict[str, Any]) -> Any:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "capabilities": CAPS, **entry}]}))
    return load_registry(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"provider": "openai", "base_url": "http://u.test/v1", "region": "us-east-1"},
            "model 'm': region: only a bedrock upstream takes it",
        ),
        (
            {"provider": "openai", "base_url": "http://u.test/v1", "workflow": "w.json"},
            "model 'm': workflow: only a comfyui upstream takes it",
        ),
        (  # Bedrock signs with the AWS credential chain
            {"provider": "bedrock", "region": "us-east-1", "api_key_env": "K"},
            "model 'm': api_key_env: only a openai or azure_openai",
        ),
    ],
)
def test_a_kinds_own_fields_are_refused_on_another(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        _load(tmp_path, entry)
    assert message in str(caught.value)


def test_an_entry_of_a_built_kind_loads_as_before(tmp_path: Path) -> None:
    spec = _load(tmp_path, {"provider": "openai", "base_url": "http://u.test/v1"}).get("m")
    assert spec.provider == "openai"
    (only,) = spec.upstreams()
    assert (only.provider, only.base_url) == ("openai", "http://u.test/v1")


def test_every_kind_the_registry_takes_has_a_provider() -> None:
    """The guard for the next kind: a kind added to RemoteKind without its provider
    in shared/providers' REMOTE table would load, then fail every job."""
    from shared.providers import REMOTE
    from shared.registry.entries import REMOTE_KINDS

    assert set(REMOTE) == set(REMOTE_KINDS)
    for path in REMOTE.values():
        module, name = path.split(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name).shared)
