"""Providers: one small interface (``Provider.generate``), one module each."""

from __future__ import annotations

from shared.core.errors import PermanentProviderError, ProviderError, TransientProviderError
from shared.providers.base import (
    GeneratedImage,
    Provider,
)
from shared.registry import ModelSpec


def get_provider(spec: ModelSpec) -> Provider:
    if spec.provider == "procedural":
        from shared.providers.procedural import ProceduralProvider

        return ProceduralProvider()
    if spec.provider == "diffusers":
        # Imported only here: torch and diffusers load in GPU workers alone.
        from shared.providers.local.diffusion import DiffusersProvider

        return DiffusersProvider()
    from shared.providers.openai_compat import OpenAICompatibleProvider

    return OpenAICompatibleProvider.shared()


__all__ = [
    "GeneratedImage",
    "PermanentProviderError",
    "Provider",
    "ProviderError",
    "TransientProviderError",
    "get_provider",
]
