from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.jobs.schemas import GenerationParams
from shared.registry import ModelSpec


@dataclass
class GeneratedImage:
    data: bytes
    revised_prompt: str | None = None


@dataclass
class Generation:
    images: list[GeneratedImage]
    usage: dict[str, Any] | None = field(default=None)


class ProviderError(Exception):
    """A provider call failed."""

    code = "provider_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class TransientProviderError(ProviderError):
    """Worth retrying: timeouts, connection errors, 429, 5xx."""

    code = "upstream_unavailable"

    def __init__(self, message: str, *, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class PermanentProviderError(ProviderError):
    """Never retried: invalid request, content policy, bad credentials."""

    code = "upstream_rejected"


class Provider(Protocol):
    def generate(self, spec: ModelSpec, params: GenerationParams, count: int,
                 first_index: int) -> Generation:
        """Make ``count`` images (images ``first_index`` .. of the job)."""
        ...
