"""The model registry: which public model names exist and what each can do.

Loaded from the YAML file at ``IMAGEGEN_MODELS_FILE``; without one, the built-in
models (``catalogue.py``). An entry is a ``ModelSpec`` (``entries.py``: one kind per
``provider``); the /v1/models answers are in ``schemas.py``. A models file that
cannot be used is refused in one line naming the entry and the field.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from shared.core.errors import ModelNotFound, quoted
from shared.core.settings import get_settings
from shared.registry.catalogue import PROCEDURAL, builtin_models, openai_models
from shared.registry.entries import (
    KINDS,
    MAX_LORA_SCALE,
    QUEUE_KINDS,
    Adapter,
    AnswerShape,
    Capabilities,
    Deployment,
    DiffusersModel,
    ModelBase,
    ModelSpec,
    Price,
    ProceduralModel,
    SizeRule,
    Upstream,
    UpstreamModel,
    model_spec,
    parse_size,
)
from shared.registry.workflows import entry_problem, resolve_paths

__all__ = [
    "MAX_LORA_SCALE",
    "PROCEDURAL",
    "QUEUE_KINDS",
    "Adapter",
    "AnswerShape",
    "Capabilities",
    "Deployment",
    "DiffusersModel",
    "ModelBase",
    "ModelSpec",
    "Price",
    "ProceduralModel",
    "Registry",
    "RegistryError",
    "SizeRule",
    "Upstream",
    "UpstreamModel",
    "get_registry",
    "load_registry",
    "model_spec",
    "openai_models",
    "parse_size",
]


class RegistryError(ValueError):
    """A models file that cannot be used; the message names the entry and field."""


class Registry(BaseModel):
    models: list[ModelSpec]

    @property
    def local_queues(self) -> set[str]:
        """Queues that local models run on (served by GPU workers)."""
        return {spec.queue for spec in self.models if isinstance(spec, DiffusersModel)}

    def get(self, name: str | None) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        known = ", ".join(spec.name for spec in self.models)
        hint = ""
        if not os.environ.get("OPENAI_API_KEY") and str(name).startswith(("dall-e", "gpt-image")):
            hint = " (OpenAI's models are served when OPENAI_API_KEY is set)"
        raise ModelNotFound(
            f"The model '{quoted(name)}' does not exist. Available: {known}{hint}.",
            param="model",
        )

    @property
    def default_model(self) -> str:
        return self.models[0].name


def load_registry(path: Path | None) -> Registry:
    if path is None:
        return Registry(models=builtin_models())
    data = yaml.safe_load(Path(path).read_text()) or {}
    for entry in data.get("models") or [] if isinstance(data, dict) else []:
        # comfyui: a relative workflow path is the models file's neighbour.
        resolve_paths(entry, Path(path).parent)
        # An entry of deployments may leave its provider to them (issue 26's form).
        if isinstance(entry, dict) and "provider" not in entry:
            deployments = entry.get("deployments")
            if isinstance(deployments, list) and deployments and isinstance(deployments[0], dict):
                entry["provider"] = deployments[0].get("provider", "openai")
    try:
        registry = Registry.model_validate(data)
    except ValidationError as exc:
        raise RegistryError(f"{path}: {_describe(exc, data)}") from None
    problem = _routing_problem(registry)
    if problem:
        raise RegistryError(f"{path}: {problem}")
    return registry


def _routing_problem(registry: Registry) -> str | None:
    """A mistake in deployments or fallbacks, in one line naming the entry: a
    fallback to an unknown model, to one on another queue, a cycle of fallbacks, two
    deployments with one id, a deployment whose key variable is not set, a comfyui
    workflow that cannot be read or lacks a node input its workflow_inputs name."""
    by_name = {spec.name: spec for spec in registry.models}
    for spec in registry.models:
        where = f"model {spec.name!r}"
        for other in spec.fallbacks:
            if other not in by_name:
                return f"{where}: fallbacks: there is no model {other!r}"
            if by_name[other].queue != spec.queue:
                return (
                    f"{where}: fallbacks: {other!r} runs on queue {by_name[other].queue!r}, "
                    f"not {spec.queue!r}"
                )
        cycle = _cycle(spec.name, by_name, [])
        if cycle:
            return f"{where}: fallbacks: a cycle ({' -> '.join(cycle)})"
        if isinstance(spec, UpstreamModel):
            workflow = entry_problem(spec)
            if workflow:
                return f"{where}: {workflow}"
            ids = [d.id for d in spec.deployments]
            doubled = sorted({i for i in ids if ids.count(i) > 1})
            if doubled:
                return f"{where}: deployments: two deployments have the id {doubled[0]!r}"
            for deployment in spec.deployments:
                env = deployment.api_key_env
                if env and not os.environ.get(env):
                    return f"{where}: deployment {deployment.id!r}: {env} is not set"
    return None


def _cycle(name: str, by_name: dict[str, ModelSpec], path: list[str]) -> list[str] | None:
    if name in path:
        return [*path[path.index(name) :], name]
    for other in by_name[name].fallbacks if name in by_name else []:
        found = _cycle(other, by_name, [*path, name])
        if found:
            return found
    return None


def _describe(exc: ValidationError, data: Any) -> str:
    """The first problem, named by entry and field: "model 'sd15': steps: ..."."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        entries = data.get("models") if isinstance(data, dict) else None
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"model {name!r}: " if name else f"models[{loc[1]}]: "
        loc = loc[2:]
    # Inside an entry, pydantic names the kind (the union's tag) before the field.
    kind = str(loc.pop(0)) if loc and loc[0] in KINDS else None
    field, message = _problem(error, kind, [str(part) for part in loc])
    return f"{where}{field + ': ' if field else ''}{message}"


def _problem(error: ErrorDetails, kind: str | None, loc: list[str]) -> tuple[str, str]:
    """(the field, what is wrong with it), in the models file's words."""
    tags = ", ".join(repr(tag) for tag in list(KINDS)[:-1]) + f" or {list(KINDS)[-1]!r}"
    if error["type"] == "union_tag_not_found":  # no provider
        return "provider", "Field required"
    if error["type"] == "union_tag_invalid":
        return "provider", f"Input should be {tags}"
    field = ".".join(loc)
    if error["type"] == "extra_forbidden" and kind is not None and len(loc) == 1:
        # A field another kind takes: name the kinds that do, and this entry's.
        # Each kind of entry once, by its first tag (every remote kind is an
        # UpstreamModel, named 'openai').
        first = {cls: tag for tag, cls in reversed(KINDS.items())}
        owners = [tag for cls, tag in first.items() if loc[0] in cls.model_fields]
        owners.sort(key=list(KINDS).index)
        if owners:
            takers = " or ".join(f"{_a(owner)} {owner!r}" for owner in owners)
            return field, f"only {takers} model takes it, not {_a(kind)} {kind!r} one"
    return field, str(error["msg"]).removeprefix("Value error, ")


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@lru_cache
def get_registry() -> Registry:
    return load_registry(get_settings().models_file)
