"""An upstream's image URL is fetched only where it is safe to (shared/providers/
openai_compat.py): on the upstream's own origin, or on a public host; redirects on
the same origin only; never more than MAX_DOWNLOAD_BYTES."""

from __future__ import annotations

import httpx
import pytest

from shared.core.errors import PermanentProviderError
from shared.providers import openai_compat
from shared.providers.openai_compat import OpenAICompatibleProvider

UPSTREAM = "http://upstream.test/v1/images/generations"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100


def provider(seen: list[str], routes: dict[str, httpx.Response]) -> OpenAICompatibleProvider:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return routes.get(str(request.url), httpx.Response(404))

    return OpenAICompatibleProvider(httpx.Client(transport=httpx.MockTransport(answer)))


def test_an_image_on_the_upstreams_own_origin_is_fetched() -> None:
    seen: list[str] = []
    routes = {"http://upstream.test/files/a.png": httpx.Response(200, content=PNG)}
    fetcher = provider(seen, routes)
    with fetcher.client:
        image = fetcher._image({"url": "http://upstream.test/files/a.png"}, UPSTREAM)
    assert image.data == PNG


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/v1/images/jobs", "http://169.254.169.254/latest/meta-data/"],
)
def test_an_image_url_on_another_private_host_is_never_called(url: str) -> None:
    seen: list[str] = []
    with pytest.raises(PermanentProviderError) as caught:
        provider(seen, {})._image({"url": url}, UPSTREAM)
    assert caught.value.code == "upstream_bad_response"
    assert seen == []
    assert "resolves to 127" not in str(caught.value)  # no address named


def test_redirects_are_followed_on_the_same_origin_only() -> None:
    seen: list[str] = []
    routes = {
        "http://upstream.test/a": httpx.Response(302, headers={"location": "/b"}),
        "http://upstream.test/b": httpx.Response(200, content=PNG),
        "http://upstream.test/c": httpx.Response(
            302, headers={"location": "http://127.0.0.1:8000/v1/images/jobs"}
        ),
    }
    assert provider(seen, routes)._image({"url": "http://upstream.test/a"}, UPSTREAM).data == PNG
    with pytest.raises(PermanentProviderError, match="another host"):
        provider(seen, routes)._image({"url": "http://upstream.test/c"}, UPSTREAM)
    assert not any("127.0.0.1" in url for url in seen)


def test_a_download_is_cut_off_past_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_compat, "MAX_DOWNLOAD_BYTES", 1000)
    routes = {"http://upstream.test/big": httpx.Response(200, content=b"x" * 5000)}
    with pytest.raises(PermanentProviderError, match="larger than 1000 bytes"):
        provider([], routes)._image({"url": "http://upstream.test/big"}, UPSTREAM)
