"""A submission: one request's job as the edge accepted it, made once by the route
and carried whole to the record (api/generation.py -> shared/jobs/service.py:
create_job), instead of the same dozen arguments declared again at every layer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from shared.core.ids import new_id
from shared.idempotency.service import Claim
from shared.jobs.schemas import GenerationParams
from shared.projects.service import Principal
from shared.registry import ModelSpec
from shared.traces.service import OP_OPENAI
from shared.webhooks.service import Webhook


@dataclass(frozen=True)
class Submission:
    principal: Principal
    """Who asks: the job's project, key and (for traces) user."""
    params: GenerationParams
    """The validated request."""
    spec: ModelSpec
    """The model that serves it."""
    job_id: str = field(default_factory=lambda: new_id("job"))
    """Made at the edge: an edit's inputs are stored under it before the record."""
    surface: str = "openai"
    """Which API it came in by: ``openai`` or ``weave``."""
    track: bool = True
    """Record a trace call beside the job."""
    op_name: str = OP_OPENAI
    """The trace call's op."""
    call_inputs: dict[str, Any] | None = None
    """The trace call's inputs as the client sent them (the params when None)."""
    webhook: Webhook | None = None
    """The request's own webhook."""
    idempotency: Claim | None = None
    """The request's Idempotency-Key claim: a retry answers with the job it made."""
    cancel_after: float | None = None
    """Seconds from now: not finished by then, the job ends canceled with
    ``deadline_exceeded`` (the ``Cancel-After`` header)."""
    input_bytes: int | None = None
    """An edit's or variation's stored uploads and mask, in bytes (storage accounting)."""
    image_life: float | None = None
    """Seconds from now its images live (``Image-Expires-After``, capped at the
    project's image retention); None: the project's retention alone."""

    def for_user(self) -> Submission:
        """The params name the key's user where the request named none."""
        if self.params.user is not None or not self.principal.user:
            return self
        params = self.params.model_copy(update={"user": self.principal.user})
        return replace(self, params=params)
