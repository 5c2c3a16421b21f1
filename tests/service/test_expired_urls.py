"""A URL handed out for an image with its own short life (``Image-Expires-After``)
is signed to expire with the image: once that time passes, the URL answers 410
``image_expired`` (what the docs promise), not 403 "URL expired"; a URL that
was never ours still answers 403 (issue 29)."""

from __future__ import annotations

import time
from datetime import timedelta
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import pytest

from shared.core import storage as storage_module
from shared.core.clock import utcnow
from shared.retention import service as retention_service
from tests.service.conftest import Service
from tests.service.test_retention import generate, project_client


def test_a_short_lived_images_own_url_answers_410_once_its_time_is_up(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = project_client(service, "expired-urls")
    job = generate(service, client, {"Image-Expires-After": "1m"}, n=1)
    url = urlparse(job["result"]["data"][0]["url"])
    assert client.get(f"{url.path}?{url.query}").status_code == 200

    # Two minutes on: past the image's life and so past its URL's own expiry.
    later = time.time() + 120
    monkeypatch.setattr(storage_module, "time", SimpleNamespace(time=lambda: later))
    monkeypatch.setattr(retention_service, "utcnow", lambda: utcnow() + timedelta(minutes=2))
    gone = client.get(f"{url.path}?{url.query}")
    assert gone.status_code == 410, gone.text
    assert gone.json()["error"]["code"] == "image_expired"

    # Not our signature: refused as before, whatever the image.
    query = parse_qs(url.query)
    forged = f"{url.path}?expires={query['expires'][0]}&signature={'0' * 64}"
    assert client.get(forged).status_code == 403
