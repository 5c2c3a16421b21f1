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


class Provider(Protocol):
    def generate(
        self, spec: ModelSpec, params: GenerationParams, count: int, first_index: int
    ) -> Generation:
        """Make ``count`` images (images ``first_index`` .. of the job)."""
        ...
