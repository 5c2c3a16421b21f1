"""Validate a generation request against the chosen model's declared capabilities."""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import ValidationError

from shared.core.errors import InvalidRequest, quoted, schema_error
from shared.jobs.schemas import (
    MAX_SEED,
    GenerationParams,
    ImageGenerationRequest,
    LoraChoice,
    LoraRequest,
)
from shared.registry import DiffusersModel, ModelSpec, Registry, parse_size


def parse_request(body: Any) -> ImageGenerationRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return ImageGenerationRequest.model_validate(body)
    except ValidationError as exc:
        raise schema_error(exc.errors()[0]) from None


def _choice(
    value: str | None, allowed: list[str], default: str | None, param: str, model: str
) -> str | None:
    if value is None:
        return default
    if value not in allowed:
        if not allowed:
            raise InvalidRequest(
                f"The model '{model}' does not support '{param}'.",
                param=param,
                code="invalid_value",
            )
        raise InvalidRequest(
            f"Invalid value '{quoted(value)}' for '{param}' with model '{model}'. "
            f"Supported values are: {', '.join(repr(a) for a in allowed)}.",
            param=param,
            code="invalid_value",
        )
    return value


def _size(value: str | None, spec: ModelSpec) -> str | None:
    """A listed size, or (for a model with a size rule) any WIDTHxHEIGHT in its bounds."""
    rule = spec.capabilities.custom_sizes
    if rule is None or value is None or value in spec.capabilities.sizes:
        return _choice(value, spec.capabilities.sizes, spec.default_size, "size", spec.name)
    wh = parse_size(value)
    if wh is None or 0 in wh:
        raise InvalidRequest(
            f"Invalid size '{quoted(value)}' for model '{spec.name}': give WIDTHxHEIGHT or one of "
            f"{', '.join(repr(s) for s in spec.capabilities.sizes)}.",
            param="size",
            code="invalid_value",
        )
    problem = rule.problem(*wh)
    if problem:
        raise InvalidRequest(
            f"Invalid size '{quoted(value)}' for model '{spec.name}': {problem}.",
            param="size",
            code="invalid_value",
        )
    return f"{wh[0]}x{wh[1]}"


def _lora(choices: list[LoraRequest] | None, spec: ModelSpec) -> list[LoraChoice]:
    """The adapters a request names, each one of the model's, named once, its scale
    filled in from the adapter's default. The list's length and each scale's bounds
    are the schema's (``LoraRequest``, ``MAX_LORAS``)."""
    if not choices:
        return []
    adapters = spec.adapters if isinstance(spec, DiffusersModel) else {}
    if not adapters:
        raise InvalidRequest(
            f"The model '{spec.name}' does not support 'lora'.", param="lora", code="invalid_value"
        )
    # Params named as schema_error names a list item's (``lora.1.name``): one
    # spelling for a field whoever refuses it.
    taken: list[LoraChoice] = []
    for i, choice in enumerate(choices):
        adapter = adapters.get(choice.name)
        if adapter is None:
            known = sorted(adapters)
            listed = ", ".join(repr(a) for a in known[:20]) + (", ..." if len(known) > 20 else "")
            raise InvalidRequest(
                f"Invalid value '{quoted(choice.name)}' for 'lora.{i}.name': the model "
                f"'{spec.name}' has no such adapter. Its adapters are: {listed}.",
                param=f"lora.{i}.name",
                code="invalid_value",
            )
        if any(t.name == choice.name for t in taken):
            raise InvalidRequest(
                f"The adapter '{choice.name}' is named twice in 'lora'; name it once, with "
                "the scale you want.",
                param=f"lora.{i}.name",
                code="invalid_value",
            )
        scale = adapter.default_scale if choice.scale is None else choice.scale
        taken.append(LoraChoice(name=choice.name, scale=scale))
    return taken


def validate_generation(req: ImageGenerationRequest, registry: Registry) -> GenerationParams:
    spec = registry.get(req.model if req.model is not None else registry.default_model)
    caps = spec.capabilities
    name = spec.name
    if not req.prompt.strip():
        raise InvalidRequest("'prompt' must not be empty.", param="prompt", code="invalid_value")
    if len(req.prompt) > caps.max_prompt_chars:
        raise InvalidRequest(
            f"'prompt' is too long: {len(req.prompt)} characters, the maximum for '{name}' "
            f"is {caps.max_prompt_chars}.",
            param="prompt",
            code="string_above_max_length",
        )
    n = req.n if req.n is not None else 1
    if n > caps.max_n:
        raise InvalidRequest(
            f"Invalid value {n} for 'n' with model '{name}': at most {caps.max_n}.",
            param="n",
            code="invalid_value",
        )
    size = _size(req.size, spec)
    if size != "auto" and (size is None or parse_size(size) is None):
        raise InvalidRequest(f"Invalid size '{size}'.", param="size")
    output_format = _choice(req.output_format, caps.output_formats, "png", "output_format", name)
    if req.output_compression is not None:
        if not caps.output_compression:
            raise InvalidRequest(
                f"The model '{name}' does not support 'output_compression'.",
                param="output_compression",
                code="invalid_value",
            )
        if output_format == "png":
            raise InvalidRequest(
                "'output_compression' applies to jpeg and webp output only.",
                param="output_compression",
                code="invalid_value",
            )
    if req.seed is not None and not caps.seed:
        raise InvalidRequest(
            f"The model '{name}' does not support 'seed'.", param="seed", code="invalid_value"
        )
    lora = _lora(req.lora, spec)
    stream = bool(req.stream)
    if req.partial_images and not stream:
        raise InvalidRequest(
            "'partial_images' applies to streamed requests ('stream': true) only.",
            param="partial_images",
            code="invalid_value",
        )
    if stream and req.response_format == "url":
        raise InvalidRequest(
            "Streamed images come as 'b64_json'; 'response_format': 'url' cannot stream.",
            param="response_format",
            code="invalid_value",
        )
    # A seed is always recorded where the model takes one, so any job can be made
    # again exactly.
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
    return GenerationParams(
        model=name,
        prompt=req.prompt,
        n=n,
        size=size or spec.default_size,
        quality=_choice(req.quality, caps.qualities, caps.default_quality, "quality", name),
        style=_choice(req.style, caps.styles, caps.default_style, "style", name),
        # Streamed: the completed events carry the images themselves.
        response_format="b64_json" if stream else req.response_format or "url",
        output_format=output_format,  # type: ignore[arg-type]
        output_compression=req.output_compression,
        background=_choice(req.background, caps.backgrounds, None, "background", name),
        moderation=_choice(req.moderation, caps.moderations, None, "moderation", name),
        user=req.user,
        seed=seed if caps.seed else None,
        stream=stream,
        partial_images=req.partial_images or 0,
        lora=lora,
    )


# --- edits and variations: multipart form fields -------------------------------------

_INT_FIELDS = ("n", "output_compression", "partial_images", "seed")
_BOOL_FIELDS = ("stream",)
_LIST_FIELDS = ("webhook_events",)
# A form field holding a list of objects: JSON text (`-F 'lora=[{"name": "ink"}]'`).
_JSON_FIELDS = ("lora",)
# What a variation takes (dall-e-2's form); anything else there is refused.
VARIATION_FIELDS = ("model", "n", "size", "response_format", "user", "webhook_url")


def form_request(fields: dict[str, list[str]]) -> dict[str, Any]:
    """A multipart form's text fields as the JSON body a generation would send:
    numbers and booleans parsed, a bad one refused naming its field."""
    body: dict[str, Any] = {}
    for name, values in fields.items():
        key = name.removesuffix("[]")
        if key in _LIST_FIELDS:
            body[key] = values
            continue
        value = values[-1]
        if key in _JSON_FIELDS:
            try:
                body[key] = json.loads(value)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                raise InvalidRequest(
                    f'\'{key}\' must be JSON text, e.g. [{{"name": "...", "scale": 0.8}}].',
                    param=key,
                    code="invalid_value",
                ) from None
        elif key in _INT_FIELDS:
            try:
                body[key] = int(value)
            except ValueError:
                raise InvalidRequest(
                    f"'{key}' must be an integer, not {value[:40]!r}.",
                    param=key,
                    code="invalid_value",
                ) from None
        elif key in _BOOL_FIELDS:
            if value.lower() not in ("true", "false", "1", "0"):
                raise InvalidRequest(
                    f"'{key}' must be true or false.", param=key, code="invalid_value"
                )
            body[key] = value.lower() in ("true", "1")
        else:
            body[key] = value
    return body


def validate_edit(
    body: dict[str, Any], registry: Registry, operation: Literal["edit", "variation"]
) -> GenerationParams:
    """An edit's or a variation's fields, checked as a generation's are, against a
    model that serves the operation (a variation has no prompt)."""
    fidelity = body.pop("input_fidelity", None)
    if operation == "variation":
        extra = sorted(set(body) - set(VARIATION_FIELDS))
        if extra:
            raise InvalidRequest(
                f"Variations do not take '{extra[0]}'.", param=extra[0], code="invalid_value"
            )
        body = {**body, "prompt": "a variation of the image"}
    req = parse_request(body)
    spec = registry.get(req.model if req.model is not None else _default_for(registry, operation))
    if not getattr(spec.capabilities, f"{operation}s"):
        raise InvalidRequest(
            f"The model '{spec.name}' does not make {operation}s.",
            param="model",
            code="invalid_value",
        )
    if fidelity is not None and fidelity not in ("high", "low"):
        raise InvalidRequest(
            f"Invalid value '{quoted(fidelity)}' for 'input_fidelity': 'high' or 'low'.",
            param="input_fidelity",
            code="invalid_value",
        )
    params = validate_generation(req.model_copy(update={"model": spec.name}), registry)
    return params.model_copy(update={"operation": operation, "input_fidelity": fidelity})


def _default_for(registry: Registry, operation: str) -> str:
    """The first model that serves the operation (the registry's default otherwise)."""
    for spec in registry.models:
        if getattr(spec.capabilities, f"{operation}s"):
            return spec.name
    return registry.default_model


# --- fallbacks: the request as another model would take it ----------------------------

_CARRIED = ("operation", "images", "mask", "input_fidelity")


def for_fallback(params: GenerationParams, spec: ModelSpec) -> GenerationParams | None:
    """``params`` as the fallback model ``spec`` takes them, or None where it cannot
    (a size, an n, a quality or an operation it does not serve): a fallback is never
    sent a request it would refuse."""
    caps = spec.capabilities
    if (params.operation == "edit" and not caps.edits) or (
        params.operation == "variation" and not caps.variations
    ):
        return None
    # The request as the client could have sent it to the fallback: the fields
    # both shapes share, the fallback's name, and a seed only where it takes one.
    # Its LoRA adapters go along (a seed picks among the same model's images, an
    # adapter changes what is drawn): a fallback without adapters of those names
    # refuses the request and is skipped, rather than serve it without them.
    shared = params.model_dump(include=set(ImageGenerationRequest.model_fields))
    request = ImageGenerationRequest.model_validate(
        {
            **shared,
            "model": spec.name,
            "seed": params.seed if caps.seed else None,
            "partial_images": params.partial_images or None,
        }
    )
    try:
        taken = validate_generation(request, Registry(models=[spec]))
    except InvalidRequest:
        return None
    return taken.model_copy(update={name: getattr(params, name) for name in _CARRIED})
