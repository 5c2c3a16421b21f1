from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from shared.core.errors import PermanentProviderError
from shared.jobs.schemas import GenerationParams
from shared.registry import ModelBase, ModelSpec

Kind = TypeVar("Kind", bound=ModelBase)


@dataclass
class GeneratedImage:
    data: bytes
    revised_prompt: str | None = None


@dataclass
class Generation:
    images: list[GeneratedImage]
    usage: dict[str, Any] | None = field(default=None)
    # Set by the worker: the model and deployment that made the images.
    served_by: dict[str, str] | None = field(default=None)


class Progress(Protocol):
    def __call__(self, step: int, steps: int, /) -> None:
        """``step`` of ``steps`` done. Raises JobCanceled when the job must stop (it
        was canceled, or its lease was lost): a provider lets it propagate."""


def no_progress(step: int, steps: int, /) -> None:
    """For callers that follow no progress."""


class Inputs:
    """An edit's or a variation's input images (and an edit's mask), as uploaded:
    given, or read by ``load`` on first use. A queue provider's later looks at a
    job it submitted never use them, so a waiting edit does not read its uploads
    back from storage at every look."""

    def __init__(
        self,
        images: list[bytes] | None = None,
        mask: bytes | None = None,
        *,
        load: Callable[[], tuple[list[bytes], bytes | None]] | None = None,
    ) -> None:
        self._loaded = None if load is not None else (images or [], mask)
        self._load = load
        self._lock = threading.Lock()  # a fan-out's calls share one job's inputs

    def _get(self) -> tuple[list[bytes], bytes | None]:
        with self._lock:
            if self._loaded is None:
                assert self._load is not None
                self._loaded = self._load()
            return self._loaded

    @property
    def images(self) -> list[bytes]:
        return self._get()[0]

    @property
    def mask(self) -> bytes | None:
        return self._get()[1]


class Partials(Protocol):
    def __call__(self, image_index: int, partial_index: int, png: bytes, /) -> None:
        """A partial picture of image ``image_index`` (a streamed request's
        ``partial_image_index`` ``partial_index``), PNG-encoded."""


def no_partials(image_index: int, partial_index: int, png: bytes, /) -> None:
    """For jobs that stream nothing."""


def entry_of(spec: ModelSpec, kind: type[Kind]) -> Kind:
    """``spec`` as the kind of entry a provider serves: ``get_provider`` picks the
    provider by the entry's kind, so another kind here is a bug."""
    if not isinstance(spec, kind):
        raise TypeError(f"model '{spec.name}' is a {spec.provider!r} entry, not {kind.__name__}")
    return spec


@dataclass(frozen=True)
class Call:
    """One provider call: images ``first_index`` .. ``first_index + count - 1`` of
    a job, from its prompt or, for ``params.operation`` ``edit``/``variation``,
    from ``inputs``."""

    spec: ModelSpec
    params: GenerationParams
    count: int
    first_index: int = 0
    progress: Progress = no_progress
    """Providers that work in steps (local models) report them here."""
    partials: Partials = no_partials
    """Where ``params.partial_images`` asks for them, providers that can show a
    picture before it is done send it here (image indexes count from 0 in the job)."""
    inputs: Inputs | None = None


class Provider(Protocol):
    def generate(self, call: Call) -> Generation:
        """Make the call's images (a provider that cannot do its operation raises
        PermanentProviderError)."""
        ...


@dataclass(frozen=True)
class Pending:
    """A queue provider's job not done yet: look again in ``after`` seconds.
    ``status`` is the provider's own word for it (``starting``, ``IN_QUEUE``...)."""

    after: float
    status: str
    progress: tuple[int, int] | None = None
    """(step, steps) of the upstream job where the provider tells it (ComfyUI's
    sampler steps); None where it does not, or did not this time (the job keeps
    the last one noted)."""


class QueueProvider(Protocol):
    """A provider that is a queue itself (Replicate, fal, ComfyUI; issue 27): the
    worker submits, records what ``submit`` returned on the job before anything
    else (a worker that dies after it never submits again: it polls), then polls,
    holding no worker slot between looks (the job waits queued). Canceling the
    job calls ``cancel``. ``poll`` is idempotent: a job that is done answers its
    images every time it is asked."""

    def submit(self, call: Call) -> dict[str, Any]:
        """Start the upstream job for ``call``; returns what identifies it (JSON:
        the provider's id and any URLs it gave for status, result, cancel). Raises
        ProviderError as ``generate`` does (a refusal is permanent)."""
        ...

    def poll(self, call: Call, ref: dict[str, Any]) -> Generation | Pending:
        """The job's images once done (downloaded into memory from the provider's
        URLs, which never reach the client), or Pending. A failed or canceled
        upstream job raises ProviderError (content filtering: permanent)."""
        ...

    def cancel(self, spec: ModelSpec, ref: dict[str, Any]) -> None:
        """Ask the upstream to stop the job (best effort: errors are logged)."""
        ...


def mime_type(data: bytes) -> str:
    """An input image's MIME type by its signature (our edge took PNG, JPEG or WebP)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise PermanentProviderError("an input image is not PNG, JPEG or WebP", code="invalid_value")
