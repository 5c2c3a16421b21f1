"""Providers: one small interface (``Provider.generate``), one module each."""

from __future__ import annotations

from importlib import import_module

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
    module, name = REMOTE[spec.provider].split(":")
    provider: Provider = getattr(import_module(module), name).shared()
    return provider


# Each remote kind's provider (shared/registry/entries.py:REMOTE_KINDS), imported on
# first use; ``shared()`` gives the process's one instance (its HTTP client).
REMOTE = {
    "openai": "shared.providers.openai_compat:OpenAICompatibleProvider",
    "azure_openai": "shared.providers.azure_openai:AzureOpenAIProvider",
    "google": "shared.providers.google:GoogleProvider",
    "bedrock": "shared.providers.bedrock:BedrockProvider",
    "stability": "shared.providers.stability:StabilityProvider",
    "replicate": "shared.providers.replicate:ReplicateProvider",
    "fal": "shared.providers.fal:FalProvider",
    "comfyui": "shared.providers.comfyui:ComfyUIProvider",
}


__all__ = [
    "GeneratedImage",
    "PermanentProviderError",
    "Provider",
    "ProviderError",
    "TransientProviderError",
    "get_provider",
]
