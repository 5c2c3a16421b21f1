"""The console and the docs (and every other answer) carry the security headers:
a Content-Security-Policy allowing only our own scripts and styles, no framing, no
sniffing, no Referer. HSTS is left to the TLS proxy (README)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from api.middleware import security_headers
from shared.core.settings import Settings
from tests.service.conftest import Service

EXPECTED = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@pytest.mark.parametrize(
    "path",
    ["/", "/console/static/console.js", "/console/static/docs.js", "/docs", "/v1/models"],
)
def test_pages_carry_the_security_headers(service: Service, path: str) -> None:
    answer = service.client().get(path)
    assert answer.status_code == 200
    for name, value in EXPECTED.items():
        assert answer.headers[name] == value, name
    policy = dict(d.split(" ", 1) for d in answer.headers["content-security-policy"].split("; "))
    assert policy["default-src"] == "'self'"  # scripts, styles, fetches: ours only
    assert policy["frame-ancestors"] == "'none'"
    assert policy["img-src"] == "'self' data:"  # local storage: images of this origin
    assert "unsafe" not in answer.headers["content-security-policy"]
    assert "strict-transport-security" not in answer.headers  # plain HTTP: the proxy's


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_the_pages_have_no_inline_script_or_style(service: Service, path: str) -> None:
    page = service.client().get(path).text
    assert re.findall(r"<script\b[^>]*>", page)
    assert all(" src=" in tag for tag in re.findall(r"<script\b[^>]*>", page))
    assert "<style" not in page
    assert not re.search(r"\sstyle=", page)
    assert not re.search(r"\son[a-z]+=", page)  # no inline event handlers


def test_images_are_allowed_from_where_storage_links_point() -> None:
    def img_src(**settings: Any) -> str:
        # model_construct: these settings alone, whatever the environment holds
        made = Settings.model_construct(**settings)
        policy = dict(security_headers(made))[b"content-security-policy"].decode()
        return policy.split("img-src ", 1)[1].split(";", 1)[0]

    assert img_src() == "'self' data:"
    assert (
        img_src(s3_bucket="b", s3_endpoint_url="http://minio:9000")
        == "'self' data: http://minio:9000"
    )
    # Presigned URLs name the public endpoint where one is set.
    assert (
        img_src(
            s3_bucket="b",
            s3_endpoint_url="http://minio:9000",
            s3_public_endpoint_url="https://u:p@files.example.com/some/path",
        )
        == "'self' data: https://files.example.com"
    )
    assert img_src(s3_bucket="b") == "'self' data: https://*.amazonaws.com"  # AWS itself
    assert (
        img_src(public_url="https://images.example.com/base")
        == "'self' data: https://images.example.com"
    )
