"""Slow clients are cut off: a request's headers must arrive within
IMAGEGEN_CLIENT_TIMEOUT_SECONDS of its first byte (or of the connection), and each
piece of its body within as long again (api/upload_limit.py). Before, a connection
sending its headers a byte at a time was held forever: a thousand of them held a
thousand sockets and their buffers for as long as their senders liked.

uvicorn has a keep-alive timeout between requests but none while a request's
headers arrive, so its HTTP protocol is extended here (`imagegen api` runs it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.core.settings import get_settings


class SlowClientGuard(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seconds = get_settings().client_timeout_seconds
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # Between requests a first byte starts the next one's deadline (uvicorn
        # drops its keep-alive timer as soon as any byte arrives).
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
