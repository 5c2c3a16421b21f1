"""Jobs at providers that are queues themselves (issue 27: Replicate, fal, ComfyUI).

A call to such a provider is submitted once: what ``submit`` returned is recorded
on our job (``job.upstream``, by call: its first image's index) in a transaction
of its own, before anything else happens, so a worker killed afterwards resumes
from the record and polls instead of submitting (and paying) again. Then it polls;
while the upstream job is not done the attempt ends ``deferred`` (UpstreamPending:
queued again with a countdown, its attempt not counted, ``status_detail`` saying
what the provider said) and no worker slot is held meanwhile. A look that fails
for a reason that may pass is tried again later with the record kept, six times
in a row at most (a job done there is never paid twice for a glitch in fetching
its outputs); past that, or on a refusal, the record is dropped and a retry
submits anew. A record at another target than the call's is canceled there and
dropped. Canceling our
job cancels the upstream jobs (``cancel``, the ``cancel_upstream`` task); a worker
that finds its job canceled right after submitting cancels it at once.

A look that says how far the upstream job is (``Pending.progress``: ComfyUI's
sampler steps) writes it to the job's ``progress`` before the attempt ends (the
sum over the job's calls that told theirs), so a job waiting queued shows it; a
claim keeps it while the job's upstream jobs are open (``lifecycle.claim``), and
the job ends with its last step done.

An upstream job still pending ``IMAGEGEN_UPSTREAM_JOB_TIMEOUT_SECONDS`` after its
submit is canceled there and forgotten, and the call fails as a timeout (retried
by the provider retry policy, bounded). The window left: a worker killed between
the provider's answer to the submit and the record's commit submits again on
retry (one round trip wide).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, cast

import sqlalchemy as sa

from shared.core.db import unit_of_work
from shared.core.errors import (
    ImagegenError,
    JobCanceled,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
    UpstreamPending,
)
from shared.core.events import publish_changed
from shared.core.settings import get_settings
from shared.core.storage import get_storage
from shared.jobs import lifecycle
from shared.jobs.models import Job, JobStatus
from shared.jobs.routing import Target
from shared.providers import get_provider
from shared.providers.base import Call, GeneratedImage, Generation, Pending, QueueProvider
from shared.registry import QUEUE_KINDS, UpstreamModel, get_registry
from worker.leases import LEASES

log = logging.getLogger(__name__)
MAX_LOOK_SECONDS = 30.0
# Looks that fail in a row before the upstream job is given up: 2 + 4 + 8 + 16 +
# 32 s, a minute of a CDN's or the provider's trouble, before paying again.
LOOKS_IN_VAIN = 6


class UpstreamBook:
    """The upstream jobs of the jobs this process runs, as recorded on their rows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._writing: dict[str, threading.Lock] = {}  # one per job: its row's writes
        self._projects: dict[str, str] = {}
        # Each call's last (step, steps) told this attempt, and the job's as written.
        self._steps: dict[str, dict[str, tuple[int, int]]] = {}
        self._shown: dict[str, dict[str, int]] = {}

    def hold(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = dict(job.upstream or {})
            self._writing[job.id] = threading.Lock()
            self._projects[job.id] = job.project_id
            self._steps[job.id] = {}
            if isinstance(job.progress, dict):
                self._shown[job.id] = dict(job.progress)

    def project_of(self, job_id: str) -> str | None:
        with self._lock:
            return self._projects.get(job_id)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._writing.pop(job_id, None)
            self._projects.pop(job_id, None)
            self._steps.pop(job_id, None)
            self._shown.pop(job_id, None)

    def progress(self, job_id: str, key: str, steps: tuple[int, int]) -> dict[str, int] | None:
        """Note a call's (step, steps); the job's progress to write (the sum over its
        calls that told theirs), None where it is what was written already."""
        with self._lock:
            calls = self._steps.setdefault(job_id, {})
            calls[key] = steps
            total = {
                "step": sum(s for s, _ in calls.values()),
                "steps": sum(t for _, t in calls.values()),
            }
            if self._shown.get(job_id) == total:
                return None
            self._shown[job_id] = total
            return total

    def shown(self, job_id: str) -> dict[str, int] | None:
        """The job's progress as last written (by this attempt or, kept by its
        claim, an earlier one)."""
        with self._lock:
            return self._shown.get(job_id)

    def entries(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self._jobs.get(job_id, {}).values() if isinstance(e, dict)]

    def get(self, job_id: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._jobs.get(job_id, {}).get(key)
        return cast(dict[str, Any], entry) if isinstance(entry, dict) else None

    def put(self, job_id: str, key: str, entry: dict[str, Any] | None) -> bool:
        """Record (or, None, drop) one call's upstream job on the row; False when
        the job is no longer this attempt's (canceled, taken over)."""
        token = LEASES.token(job_id)
        # Written under the job's lock: a fan-out's calls record side by side, and a
        # write of an older whole could otherwise land last and lose a newer call's
        # record (its prediction then submitted again on resume).
        with self._lock:
            writing = self._writing.setdefault(job_id, threading.Lock())
        with writing:
            with self._lock:
                jobs = dict(self._jobs.get(job_id, {}))
                if entry is None:
                    jobs.pop(key, None)
                else:
                    jobs[key] = entry
                self._jobs[job_id] = jobs
            if token is None:
                return False
            with unit_of_work() as session:
                return lifecycle.note_upstream(session, job_id, token, jobs)


UPSTREAMS = UpstreamBook()


def queued(target: Target) -> bool:
    return target.spec.provider in QUEUE_KINDS


def key_of(call: Call) -> str:
    return str(call.first_index)


def resumed(call: Call, job_id: str) -> Target | None:
    """The target a call already submitted to (recorded on the job), rebuilt from
    the registry; None when there is none (or its deployment is gone)."""
    entry = UPSTREAMS.get(job_id, key_of(call))
    if entry is None or "ref" not in entry:
        return None
    found = _recorded_at(entry, job_id)
    if found is None:
        return None
    spec, served = found
    if served is None:
        return None
    model, deployment = str(entry.get("model")), str(entry.get("deployment"))
    return Target(served, call.params, model, deployment, cools=bool(spec.deployments))


def _recorded_at(
    entry: dict[str, Any], job_id: str
) -> tuple[UpstreamModel, UpstreamModel | None] | None:
    """A record's model from the registry, and the model as the record's deployment
    serves it (None: that deployment is gone); None when the model is gone."""
    model, deployment = str(entry.get("model")), str(entry.get("deployment"))
    try:
        spec = get_registry().get(model)
    except ImagegenError:
        log.warning("job %s: model %r of its upstream job is gone", job_id, model)
        return None
    if not isinstance(spec, UpstreamModel):
        return None
    for upstream in spec.upstreams():
        if upstream.id == deployment:
            return spec, spec.served_by(upstream) if spec.deployments else spec
    log.warning("job %s: deployment %r of its upstream job is gone", job_id, deployment)
    return spec, None


def _submitted(
    provider: QueueProvider, call: Call, target: Target, job_id: str, key: str
) -> dict[str, Any]:
    """The call's record: the one an earlier attempt left at this target, or a
    submit made and recorded now."""
    entry = UPSTREAMS.get(job_id, key)
    submits = int(entry.get("submits") or 1) if entry is not None else 0
    if (
        entry is not None
        and "ref" in entry
        and (entry.get("model"), entry.get("deployment"))
        != (
            target.model,
            target.deployment,
        )
    ):
        # Recorded at another target (its deployment is gone from the registry, or
        # the call moved on): that job is stopped there and this one starts anew.
        log.warning("job %s: its upstream job was at %s; submitting anew", job_id, entry)
        cancel_entry(entry, job_id)
        entry = None
    if entry is not None and "ref" in entry:
        return entry
    if submits >= get_settings().provider_max_attempts:
        # Each submit failed there or never finished: never resubmitted forever.
        raise PermanentProviderError(
            f"{target.spec.provider}: the job failed there {submits} times",
            code="upstream_error",
        )
    ref = provider.submit(call)
    entry = {
        "provider": target.spec.provider,
        "model": target.model,
        "deployment": target.deployment,
        "ref": ref,
        "submitted_at": time.time(),
        "submits": submits + 1,
    }
    try:
        recorded = UPSTREAMS.put(job_id, key, entry)
    except sa.exc.SQLAlchemyError as exc:
        # Unrecorded, it would run there unseen: stop it, and try again later.
        _cancel(provider, target.spec, ref, job_id)
        raise TransientProviderError(
            f"could not record {target.spec.provider}'s job ({type(exc).__name__})",
            code="upstream_unavailable",
        ) from None
    if not recorded:
        _cancel(provider, target.spec, ref, job_id)  # not ours any more: stop paying
        raise JobCanceled()
    return entry


def call(call: Call, target: Target, job_id: str) -> Generation:
    """Submit (once) and look: the images, or UpstreamPending."""
    provider = cast(QueueProvider, get_provider(target.spec))
    key = key_of(call)
    entry = _submitted(provider, call, target, job_id, key)
    kept = _kept(entry)
    if kept is not None:
        return kept
    try:
        answer = provider.poll(call, cast(dict[str, Any], entry["ref"]))
    except TransientProviderError as exc:
        return _looked_in_vain(entry, key, job_id, exc)
    except ProviderError:
        _forget(job_id, key, entry)  # refused there: nothing to come back to
        raise
    if isinstance(answer, Pending):
        waited = time.time() - float(entry.get("submitted_at") or time.time())
        if waited > get_settings().upstream_job_timeout_seconds:
            # Stuck there: stop paying, forget it, and let the retry policy decide
            # whether to submit anew (bounded like any call's retries).
            _cancel(provider, target.spec, cast(dict[str, Any], entry["ref"]), job_id)
            _forget(job_id, key, entry)
            raise TransientProviderError(
                f"{target.spec.provider}'s job did not finish in "
                f"{get_settings().upstream_job_timeout_seconds:.0f} s (it was {answer.status})",
                code="upstream_timeout",
            )
        # Looked at less often the longer it takes (a third of its age, at most
        # MAX_LOOK_SECONDS): 2,000 jobs of a minute each cost about 10 looks each,
        # not 30 (bench/bench_capacity.py --queue-provider).
        if answer.progress is not None:
            _note_progress(job_id, key, answer.progress)
        raise UpstreamPending(
            f"waiting for {target.spec.provider}: its job is {answer.status}"[:300],
            retry_after=max(0.2, answer.after, min(MAX_LOOK_SECONDS, waited / 3)),
        )
    shown = UPSTREAMS.shown(job_id)
    if shown and shown.get("steps"):  # its steps were shown: it ends with all done
        call.progress(int(shown["steps"]), int(shown["steps"]))
    if call.count < call.params.n:  # a fan-out: its other calls may still be out
        _keep(answer, entry, key, job_id)
    elif entry.get("failures"):
        UPSTREAMS.put(job_id, key, {**entry, "failures": 0})
    return answer


def _note_progress(job_id: str, key: str, steps: tuple[int, int]) -> None:
    """Write how far the job is, now: the attempt ends deferred right after, so the
    progress writer's later write (worker/progress.py) would find it no longer this
    attempt's. Best effort: a write that fails is logged."""
    total = UPSTREAMS.progress(job_id, key, steps)
    token = LEASES.token(job_id)
    if total is None or token is None:
        return
    try:
        with unit_of_work() as session:
            moved = lifecycle.note_progress(session, job_id, token, total)
    except sa.exc.SQLAlchemyError as exc:
        log.warning("job %s: progress not recorded: %s", job_id, exc)
        return
    if moved:
        publish_changed(job_id, JobStatus.running)


def _keep(generation: Generation, entry: dict[str, Any], key: str, job_id: str) -> None:
    """A fan-out's call done while others are still out: its images are kept in our
    storage and the record says where, so a later look takes them from there
    instead of asking (and downloading) again: a provider may delete outputs
    (Replicate after an hour), and a job waiting on its other calls would then pay
    for this one again. Best effort: unkept, the next look asks the provider."""
    project = UPSTREAMS.project_of(job_id)
    if project is None:
        return
    keys = [f"{project}/{job_id}/upstream/{key}-{i}" for i in range(len(generation.images))]
    try:
        storage = get_storage()
        for name, image in zip(keys, generation.images, strict=True):
            storage.put(name, image.data, "application/octet-stream")
        UPSTREAMS.put(job_id, key, {**entry, "failures": 0, "kept": keys})
    except Exception as exc:  # storage or the database out: asked again next time
        log.warning("job %s: a finished call's images not kept: %s", job_id, exc)


def _kept(entry: dict[str, Any]) -> Generation | None:
    keys = entry.get("kept")
    if not isinstance(keys, list) or not keys:
        return None
    try:
        storage = get_storage()
        return Generation(images=[GeneratedImage(storage.get(str(name))) for name in keys])
    except Exception as exc:  # gone or unreachable: ask the provider again
        log.warning("kept images unreadable (%s); asking the provider again", exc)
        return None


def _looked_in_vain(
    entry: dict[str, Any], key: str, job_id: str, exc: TransientProviderError
) -> Generation:
    """A look failed for a reason that may pass: the upstream job failed there (an
    aborted prediction, a lost prompt) or only our look did (its outputs not
    fetched). Looked at again later, the record kept, up to LOOKS_IN_VAIN times in a
    row (a job done there is then never paid twice); past that it is forgotten and
    the error raised, so the retry policy submits anew."""
    failures = int(entry.get("failures") or 0) + 1
    if failures >= LOOKS_IN_VAIN:
        _forget(job_id, key, entry)
        raise exc
    if not UPSTREAMS.put(job_id, key, {**entry, "failures": failures}):
        raise JobCanceled()
    raise UpstreamPending(
        f"looking again at {entry.get('provider')}'s job: {exc.message}"[:300],
        retry_after=max(exc.retry_after or 0.0, 2.0**failures),
    )


def _forget(job_id: str, key: str, entry: dict[str, Any]) -> None:
    """Drop a call's upstream job, keeping how many times it was submitted (the
    next submit counts on from there: bounded by IMAGEGEN_PROVIDER_MAX_ATTEMPTS)."""
    UPSTREAMS.put(job_id, key, {"submits": int(entry.get("submits") or 1)})


def cancel_open(job_id: str) -> None:
    """The job failed: its calls' upstream jobs still recorded are canceled there
    (a fan-out whose one call was refused leaves the others running)."""
    for entry in UPSTREAMS.entries(job_id):
        if "ref" in entry:
            cancel_entry(entry, job_id)


def cancel(job_id: str) -> int:
    """The ``cancel_upstream`` task: cancel a canceled job's upstream jobs; returns
    how many were asked."""
    with unit_of_work() as session:
        job = session.get(Job, job_id)
        # Only a job canceled still (never one a worker runs on).
        gone = job is not None and job.status == JobStatus.canceled
        upstream = dict(job.upstream or {}) if gone and job is not None else {}
    asked = sum(
        cancel_entry(entry, job_id)
        for entry in upstream.values()
        if isinstance(entry, dict) and "ref" in entry
    )
    if gone:
        with unit_of_work() as session:
            lifecycle.close_upstream(session, job_id)
    return asked


def cancel_entry(entry: dict[str, Any], job_id: str) -> bool:
    """Cancel one recorded upstream job at the target it was submitted to (its
    model's own connection where that deployment is gone); False when the model is
    no longer in the registry."""
    found = _recorded_at(entry, job_id)
    if found is None:
        return False
    served = found[1] or found[0]
    _cancel(cast(QueueProvider, get_provider(served)), served, entry.get("ref") or {}, job_id)
    return True


def _cancel(provider: QueueProvider, spec: Any, ref: dict[str, Any], job_id: str) -> None:
    try:
        provider.cancel(spec, ref)
    except Exception as exc:  # best effort: the provider's job may have ended anyway
        log.warning("job %s: upstream cancel failed: %s", job_id, exc)
