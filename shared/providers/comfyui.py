"""``comfyui``: a self-hosted ComfyUI server (one or several, as a model's deployments),
a queue itself: a workflow is queued, looked at until done, its images fetched.

It speaks ComfyUI's own HTTP API, as its repository documents it (``server.py``'s
routes, ``script_examples/basic_api_example.py`` and ``websockets_api_example.py``;
https://docs.comfy.org/development/comfyui-server/comms_routes):

- submit: ``POST {base_url}/prompt`` with ``{"prompt": <the workflow, API format>,
  "client_id": <uuid>}``, answered ``{"prompt_id", "number", "node_errors"}``; a
  workflow the server refuses answers 400 ``{"error": {"type", "message", "details"},
  "node_errors": {node_id: {"errors": [...], "class_type"}}}``: a permanent refusal,
  naming the node.
- look: ``GET {base_url}/history/{prompt_id}`` answers ``{}`` until the prompt has
  run, then ``{prompt_id: {"outputs": {node_id: {"images": [{"filename",
  "subfolder", "type"}]}}, "status": {"status_str", "completed", "messages"}}}``. An
  empty history is told apart from a prompt the server no longer has (deleted from
  its queue, or the server restarted: its queue and history live in memory) by
  ``GET {base_url}/prompt``'s ``exec_info.queue_remaining``: nothing queued or
  running, and still no history, is a lost prompt (a transient failure: the worker
  drops it and a retry queues it again). ``/queue`` would tell queued from running
  but carries every queued workflow whole, too heavy to read on each look.
- images: ``GET {base_url}/view?filename=&subfolder=&type=`` on the server's own
  origin (built from ``base_url``, never from the answer), read up to
  MAX_DOWNLOAD_BYTES.
- progress: while a prompt waits, each look also opens ``{base_url}/ws?clientId=``
  (ws:// or wss://, the submit's ``client_id``: ComfyUI sends a prompt's events only
  to the socket of the client that queued it) for at most PROGRESS_LISTEN_SECONDS.
  On connecting the server sends ``{"type": "status", "data": {"status":
  {"exec_info"}, "sid"}}`` and, to the client whose prompt is executing, ``{"type":
  "executing", "data": {"node"}}`` (server.py's websocket_handler); its sampler
  then reports ``{"type": "progress", "data": {"value", "max", "prompt_id",
  "node"}}`` at each step (main.py's progress hook). The first such message for one
  of the call's prompts is the call's progress (``Pending.progress``); none within
  HINT_SECONDS of the status (not running: queued behind others) or by the limit is
  no progress this time. Binary frames (previews) and other clients' messages are
  skipped. Progress is best effort: a socket that fails is logged, never an error.
- edits: the image (and mask) uploaded first with ``POST {base_url}/upload/image``
  (multipart ``image`` with ``type=input``, ``subfolder``, ``overwrite``; answered
  ``{"name", "subfolder", "type"}``), its ``subfolder/name`` set on the LoadImage
  (LoadImageMask) node input ``workflow_inputs`` maps ``image`` (``mask``) to.
- cancel: ``GET {base_url}/queue``; a prompt still in ``queue_pending`` is deleted
  (``POST /queue`` ``{"delete": [prompt_id]}``), one in ``queue_running`` is
  interrupted (``POST /interrupt`` ``{"prompt_id"}``: recent servers interrupt
  only that prompt; older ones ignore the body, which is why it is sent only while
  that prompt is the one running).

ComfyUI has no authentication of its own; where ``api_key_env`` is set (a server
behind an authenticating proxy) its value is sent as ``Authorization: Bearer`` on
every call and on the websocket's handshake, to the configured server only: every
URL is built from ``base_url``, redirects are not followed (the socket is opened to
base_url's host by us, so the websocket client cannot follow one elsewhere), and no
proxy from the environment is used for the socket.

The request's fields go into the workflow's node inputs that ``workflow_inputs``
names (``shared/registry/workflows.py``): the prompt; the seed (``params.seed``,
which our edge always sets for a model with ``capabilities.seed``, else a random
one, recorded in the upstream job's reference either way); width and height from
the size; the call's image count into the ``n`` input (a batch size) where mapped,
else one prompt per image, seeds counting up from the call's. A job's image ``i``
is made with seed ``seed + i`` where each prompt makes one image, as the job's
``seeds`` say; a batched prompt makes its images from its one seed.

An edit's first image goes to the ``image`` input; its mask to ``mask`` (without
one, a fully transparent mask of the image's size: the whole image is edited, as
the local models do). Files are named by their content (``imagegen/<sha256>.png``),
so an upload made again (a worker killed after uploading, before the submit was
recorded) lands on the same file instead of a new one; a call uploads once, and
every prompt of it names the same files. What a submit uploaded is recorded with
its prompts (``inputs``); a resumed job finds the record and never uploads again.

Not covered: more than one input image (one LoadImage is mapped; more are
refused), variations, ComfyUI's ``/upload/mask`` (which writes a mask into an
uploaded image's alpha: a LoadImageMask reading our mask's own alpha does the same),
``progress_state`` messages (newer servers' per-node state; ``progress`` is sent
too), steps (no request field sets them yet; the workflow's own value is used),
deleting uploaded inputs (ComfyUI has no route for it), and content filtering
(ComfyUI has none).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Self, TypeVar
from urllib.parse import urlencode, urlsplit

import httpx
from PIL import Image
from websockets.sync.client import connect

from shared.core.context import current
from shared.core.errors import (
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from shared.core.settings import get_settings
from shared.providers.answers import before_answer
from shared.providers.base import (
    Call,
    GeneratedImage,
    Generation,
    Inputs,
    Pending,
    entry_of,
    mime_type,
)
from shared.providers.openai_compat import (
    _TRANSIENT_STATUS,
    MAX_DOWNLOAD_BYTES,
    MAX_ERROR_BYTES,
    OpenAICompatibleProvider,
    _read_capped,
    _retry_after,
    _upstream_errors,
)
from shared.registry import ModelSpec, UpstreamModel, parse_size
from shared.registry.workflows import Workflow, load_workflow, target

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seeds we pick when the request names none (as our edge picks them); KSampler takes
# any below 2**64, so a seed counted up from one of ours stays in range.
RANDOM_SEEDS = 2**32
SEED_LIMIT = 2**64
# A history entry holds the workflow, its outputs' names and, on failure, the
# traceback and inputs of the failing node.
MAX_HISTORY_BYTES = 8 * 1024 * 1024
# /queue holds every queued workflow whole (read only to cancel).
MAX_QUEUE_BYTES = 32 * 1024 * 1024
MAX_MESSAGE_CHARS = 500
# Out of GPU memory (torch's error): worth another try, on another box perhaps.
_OOM = re.compile(r"out ?of ?memory", re.IGNORECASE)
# A look at a waiting prompt listens this long at most for its progress (the worker
# thread is held meanwhile, so it is short: a sampler step of an SD model takes a
# fraction of a second; a slower one is simply seen at a later look).
PROGRESS_LISTEN_SECONDS = 1.0
# ComfyUI tells a client on connecting that its prompt executes (``executing``
# right after ``status``, in the same handler); nothing by then: not running.
HINT_SECONDS = 0.2
CLOSE_SECONDS = 0.25
# Preview images come as binary frames (skipped) of up to a few hundred KB.
MAX_WS_MESSAGE_BYTES = 4 * 1024 * 1024
# The submit's client_id as we make it (uuid4); anything else is not put in a URL.
_CLIENT_ID = re.compile(r"[0-9a-f-]{36}")
# Our uploads, apart from the server's other inputs.
UPLOAD_SUBFOLDER = "imagegen"
_WAITING = "queued or running"
# Messages that show the call's prompt executing now, and those that end it.
_RUNNING = {"executing", "execution_start", "execution_cached", "executed", "progress"}
_ENDED = {"execution_success", "execution_error", "execution_interrupted"}


class PromptLost(TransientProviderError):
    """The server no longer knows a prompt it took (deleted, or it restarted)."""


class ComfyUIProvider:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    @classmethod
    def shared(cls) -> Self:
        """The process's one instance: its own HTTP client, pooled as the openai
        provider's, shared by every worker thread."""
        return current().made(
            "comfyui", lambda context: cls(OpenAICompatibleProvider._make(context).client)
        )

    # --- Provider: in place --------------------------------------------------------

    def generate(self, call: Call) -> Generation:
        """Submit, then look until done, sleeping as each look says, for at most
        IMAGEGEN_PROVIDER_TIMEOUT_SECONDS; a prompt given up on (the time limit, a
        cancel raised meanwhile) is canceled on the server."""
        deadline = time.monotonic() + get_settings().provider_timeout_seconds
        ref = self.submit(call)
        try:
            answer = self.poll(call, ref)
            while isinstance(answer, Pending) and time.monotonic() < deadline:
                if answer.progress is not None:
                    call.progress(*answer.progress)
                time.sleep(max(0.0, min(answer.after, deadline - time.monotonic())))
                answer = self.poll(call, ref)
        except ProviderError:  # it failed there: nothing left to cancel
            raise
        except BaseException:  # canceled under us, or the process stopping
            self.cancel(call.spec, ref)
            raise
        if isinstance(answer, Generation):
            return answer
        self.cancel(call.spec, ref)
        raise TransientProviderError(
            f"the ComfyUI prompt was still {answer.status} at the time limit",
            code="upstream_timeout",
        )

    # --- QueueProvider -------------------------------------------------------------

    def submit(self, call: Call) -> dict[str, Any]:
        """Queue the call's prompts: one with a batch of ``count`` where the workflow
        maps ``n``, else one per image. Returns their ids and seeds."""
        spec = entry_of(call.spec, UpstreamModel)
        _check_operation(spec, call)
        workflow = _workflow(spec)
        # Uploaded once for all the call's prompts (an edit's; {} otherwise).
        uploads = self._upload_inputs(spec, call.inputs) if "image" in spec.workflow_inputs else {}
        first = call.params.seed if call.params.seed is not None else _random_seed()
        first += call.first_index
        if "n" in spec.workflow_inputs:
            batches = [(first, call.count)]
        else:
            batches = [(first + i, 1) for i in range(call.count)]
        client_id = str(uuid.uuid4())
        prompts: list[dict[str, Any]] = []
        try:
            for seed, count in batches:
                graph = build_workflow(spec, workflow, call.params.prompt, call.params.size)
                for field, name in uploads.items():
                    _set(graph, spec, field, name)
                _set(graph, spec, "seed", seed % SEED_LIMIT)
                _set(graph, spec, "n", count)
                answer = self._post(spec, "/prompt", {"prompt": graph, "client_id": client_id})
                prompts.append(_queued(answer, seed % SEED_LIMIT, count))
        except BaseException:
            if prompts:  # half queued: take back what was, best effort
                try:
                    self.cancel(spec, {"prompts": prompts})
                except Exception as exc:
                    log.warning("model %s: ComfyUI prompts left queued: %s", spec.name, exc)
            raise
        ref: dict[str, Any] = {"client_id": client_id, "prompts": prompts}
        if uploads:
            ref["inputs"] = uploads
        return ref

    def poll(self, call: Call, ref: dict[str, Any]) -> Generation | Pending:
        """The images once every prompt of the call has run; Pending while one has
        not (or the server could not be reached: its prompt is still there)."""
        spec = entry_of(call.spec, UpstreamModel)
        prompts = _prompts(ref)
        entries = []
        for prompt in prompts:
            entry = self._unless_unreached(spec, partial(self._entry, spec, prompt["prompt_id"]))
            if isinstance(entry, Pending):
                if entry.status.startswith(_WAITING):  # the server has it: how far?
                    entry = replace(entry, progress=self._progress(spec, ref, prompts))
                return entry
            entries.append((prompt, entry))
        outputs = [_outputs(prompt, entry) for prompt, entry in entries]
        # The images only once the job holds an answer slot (answers.py).
        before_answer()
        images = []
        for found in outputs:
            for image in found:
                data = self._unless_unreached(spec, partial(self._view, spec, image))
                if isinstance(data, Pending):
                    return data
                images.append(data)
        return Generation(images=[GeneratedImage(data) for data in images])

    def cancel(self, spec: ModelSpec, ref: dict[str, Any]) -> None:
        """Delete the call's prompts still queued, interrupt the one running."""
        entry = entry_of(spec, UpstreamModel)
        ids = {str(prompt["prompt_id"]) for prompt in _prompts(ref)}
        queue = self._get(entry, "/queue", MAX_QUEUE_BYTES)
        running = _ids(queue.get("queue_running")) & ids
        pending = _ids(queue.get("queue_pending")) & ids
        if pending:
            self._post(entry, "/queue", {"delete": sorted(pending)})
        for prompt_id in sorted(running):
            self._post(entry, "/interrupt", {"prompt_id": prompt_id})
        log.info(
            "model %s: ComfyUI prompts canceled: %d deleted, %d interrupted",
            entry.name,
            len(pending),
            len(running),
        )

    # --- edits ---------------------------------------------------------------------

    def _upload_inputs(self, spec: UpstreamModel, inputs: Inputs | None) -> dict[str, str]:
        """Upload an edit's image and mask (a transparent one where the request has
        none); the names the workflow's loader inputs take, by field."""
        if inputs is None or len(inputs.images) != 1:
            raise PermanentProviderError(
                f"model '{spec.name}' (comfyui) edits one image", code="invalid_value"
            )
        if inputs.mask is not None and "mask" not in spec.workflow_inputs:
            # Dropped, the edit would change what the mask kept: refused instead.
            raise PermanentProviderError(
                f"model '{spec.name}' (comfyui) takes no mask: its workflow maps none",
                code="invalid_value",
            )
        image = inputs.images[0]
        uploads = {"image": self._upload(spec, image)}
        if "mask" in spec.workflow_inputs:
            uploads["mask"] = self._upload(spec, inputs.mask or _clear_mask(image))
        return uploads

    def _upload(self, spec: UpstreamModel, data: bytes) -> str:
        """``POST /upload/image`` of ``data``, named by its content; the value a
        LoadImage node takes for it (``subfolder/name``)."""
        kind = mime_type(data).removeprefix("image/")
        name = f"{hashlib.sha256(data).hexdigest()[:32]}.{kind}"
        answer = self._call(
            spec,
            "POST",
            "/upload/image",
            None,
            MAX_ERROR_BYTES,
            files={"image": (name, data, f"image/{kind}")},
            data={"type": "input", "subfolder": UPLOAD_SUBFOLDER, "overwrite": "true"},
        )
        uploaded, subfolder = answer.get("name"), answer.get("subfolder") or ""
        if not isinstance(uploaded, str) or not uploaded or not isinstance(subfolder, str):
            raise TransientProviderError(
                "ComfyUI took an upload without answering its name",
                code="upstream_bad_response",
            )
        return f"{subfolder}/{uploaded}" if subfolder else uploaded

    # --- progress ------------------------------------------------------------------

    def _progress(
        self, spec: UpstreamModel, ref: dict[str, Any], prompts: list[dict[str, Any]]
    ) -> tuple[int, int] | None:
        """How far the call's prompts are, as ``(step, steps)`` over all of them (a
        prompt per image runs one after another), from the server's websocket; None
        where it tells nothing within the time a look may listen."""
        ids = [str(prompt["prompt_id"]) for prompt in prompts]
        seen = self._listen(spec, ref.get("client_id"), ids)
        return None if seen is None else call_progress(ids, *seen)

    def _listen(
        self, spec: UpstreamModel, client_id: Any, ids: list[str]
    ) -> tuple[str, int, int] | None:
        """The first progress the server reports on ``client_id``'s socket for one
        of ``ids``, within PROGRESS_LISTEN_SECONDS; None otherwise, and where the
        socket fails (best effort: never an error)."""
        url = _ws_url(spec, client_id)
        if url is None:
            return None
        deadline = time.monotonic() + PROGRESS_LISTEN_SECONDS
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "wss" else 80)
            # Our socket, to base_url's host: no proxy from the environment, and the
            # websocket client follows no redirect on a socket it was given.
            sock = socket.create_connection(
                (parts.hostname or "", port), timeout=PROGRESS_LISTEN_SECONDS
            )
            with connect(
                url,
                sock=sock,
                additional_headers=_headers(spec),
                open_timeout=max(0.01, deadline - time.monotonic()),
                ping_interval=None,
                close_timeout=CLOSE_SECONDS,
                max_size=MAX_WS_MESSAGE_BYTES,
                compression=None,
            ) as ws:
                return read_progress(lambda wait: ws.recv(timeout=wait), ids, deadline)
        except Exception as exc:  # best effort: the look goes on without progress
            log.info("model %s: no progress from ComfyUI's websocket: %s", spec.name, exc)
            return None

    # --- the server's routes -------------------------------------------------------

    @staticmethod
    def _unless_unreached(spec: UpstreamModel, look: Callable[[], T]) -> T | Pending:
        """``look()``, or Pending where it did not reach the server (a timeout, a
        refused connection, a proxy's 429 or 5xx): the prompt is still there."""
        try:
            return look()
        except PromptLost:
            raise
        except TransientProviderError as exc:
            after = max(spec.poll_seconds, exc.retry_after or 0.0)
            return Pending(after=after, status=f"not reached ({exc.code})")

    def _entry(self, spec: UpstreamModel, prompt_id: str) -> dict[str, Any] | Pending:
        """A prompt's history entry once it has run, else Pending."""
        entry = self._history(spec, prompt_id)
        return entry if entry is not None else self._waiting(spec, prompt_id)

    def _history(self, spec: UpstreamModel, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry; None while it has none."""
        body = self._get(spec, f"/history/{prompt_id}", MAX_HISTORY_BYTES)
        entry = body.get(prompt_id)
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise TransientProviderError(
                "ComfyUI answered a history entry that is not an object",
                code="upstream_bad_response",
            )
        return entry

    def _waiting(self, spec: UpstreamModel, prompt_id: str) -> dict[str, Any] | Pending:
        """A prompt with no history yet: Pending while the server has work queued or
        running; lost when it has none and still no history for it (its entry when
        it ended between the two looks)."""
        info = self._get(spec, "/prompt", MAX_ERROR_BYTES).get("exec_info")
        remaining = info.get("queue_remaining") if isinstance(info, dict) else None
        if not isinstance(remaining, int) or remaining > 0:
            ahead = f" ({remaining} in the server's queue)" if isinstance(remaining, int) else ""
            return Pending(after=spec.poll_seconds, status=f"queued or running{ahead}")
        entry = self._history(spec, prompt_id)
        if entry is not None:
            return entry
        raise PromptLost(
            f"the ComfyUI server no longer has prompt {prompt_id} (deleted from its "
            "queue, or the server restarted)",
            code="upstream_unavailable",
        )

    def _view(self, spec: UpstreamModel, image: dict[str, str]) -> bytes:
        url = _base(spec) + "/view"
        with (
            _upstream_errors(),
            self.client.stream(
                "GET", url, params=image, headers=_headers(spec), follow_redirects=False
            ) as response,
        ):
            if response.status_code == 404:
                raise PromptLost(
                    f"ComfyUI no longer has the image {image['filename']!r}",
                    code="upstream_unavailable",
                )
            if response.status_code != 200:
                raise _refusal(response, _read_capped(response, MAX_ERROR_BYTES, "error"))
            return _read_capped(response, MAX_DOWNLOAD_BYTES, "image")

    def _get(self, spec: UpstreamModel, path: str, limit: int) -> dict[str, Any]:
        return self._call(spec, "GET", path, None, limit)

    def _post(self, spec: UpstreamModel, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(spec, "POST", path, body, MAX_ERROR_BYTES)

    def _call(
        self, spec: UpstreamModel, method: str, path: str, body: Any, limit: int, **form: Any
    ) -> dict[str, Any]:
        """One call; its JSON answer (an empty body as ``{}``: /queue and /interrupt
        answer 200 with none). ``form``: a multipart body's ``files`` and ``data``."""
        request: dict[str, Any] = {"headers": _headers(spec), "follow_redirects": False, **form}
        if body is not None:
            request["json"] = body
        with (
            _upstream_errors(),
            self.client.stream(method, _base(spec) + path, **request) as response,
        ):
            cap = MAX_ERROR_BYTES if response.status_code >= 400 else limit
            content = _read_capped(response, cap, "answer")
        if response.status_code >= 400:
            raise _refusal(response, content)
        if not content.strip():
            return {}
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise TransientProviderError(
                f"ComfyUI answered {method} {path} without a JSON object",
                code="upstream_bad_response",
            )
        return answer


# --- the workflow ------------------------------------------------------------------


def _workflow(spec: UpstreamModel) -> Workflow:
    if not spec.workflow:
        raise PermanentProviderError(
            f"model '{spec.name}' names no workflow", code="provider_misconfigured"
        )
    try:
        return load_workflow(spec.workflow)
    except ValueError as exc:  # checked at load; gone or changed since
        raise PermanentProviderError(
            f"model '{spec.name}': {exc}", code="provider_misconfigured"
        ) from None


def build_workflow(spec: UpstreamModel, workflow: Workflow, prompt: str, size: str) -> Workflow:
    """A copy of ``workflow`` with the prompt and size set where the entry maps them
    (the seed and count are set per prompt, by ``_set``)."""
    graph: Workflow = {
        node: {**body, "inputs": dict(body["inputs"])} for node, body in workflow.items()
    }
    _set(graph, spec, "prompt", prompt)
    wh = parse_size(size)
    if wh is not None:  # "auto": the workflow's own size
        _set(graph, spec, "width", wh[0])
        _set(graph, spec, "height", wh[1])
    return graph


def _set(graph: Workflow, spec: UpstreamModel, field: str, value: Any) -> None:
    where = spec.workflow_inputs.get(field)
    if where is None:
        return
    node, name = target(where)
    try:
        graph[node]["inputs"][name] = value
    except (KeyError, TypeError):  # checked at load; the file changed since
        raise PermanentProviderError(
            f"model '{spec.name}': workflow_inputs: {field}: the workflow has no input {where!r}",
            code="provider_misconfigured",
        ) from None


def _random_seed() -> int:
    return secrets.randbelow(RANDOM_SEEDS)


def _check_operation(spec: UpstreamModel, call: Call) -> None:
    """A workflow that loads an image serves edits, one that does not generations;
    neither serves variations."""
    operation = call.params.operation
    edits = "image" in spec.workflow_inputs
    if operation == ("edit" if edits else "generate"):
        return
    served = "edits an image (/v1/images/edits)" if edits else "makes images from a prompt only"
    raise PermanentProviderError(f"model '{spec.name}' (comfyui) {served}", code="invalid_value")


def _clear_mask(image: bytes) -> bytes:
    """A fully transparent PNG of ``image``'s size: edit all of it."""
    try:
        with Image.open(io.BytesIO(image)) as picture:
            size = picture.size
    except Exception as exc:  # checked at our edge; unreadable now is a fault here
        raise PermanentProviderError(
            f"the edit's image is unreadable: {exc}", code="invalid_value"
        ) from None
    buffer = io.BytesIO()
    Image.new("RGBA", size, (0, 0, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- progress ----------------------------------------------------------------------


def parse_message(data: str | bytes) -> tuple[str, dict[str, Any]] | None:
    """A websocket message as ``(type, data)``; None for a binary frame (a preview
    image) or anything not ComfyUI's ``{"type", "data"}``."""
    if not isinstance(data, str):
        return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    kind, body = message.get("type"), message.get("data")
    if not isinstance(kind, str) or not isinstance(body, dict):
        return None
    return kind, body


def read_progress(
    recv: Callable[[float], str | bytes], ids: Sequence[str], deadline: float
) -> tuple[str, int, int] | None:
    """The first ``progress`` for one of ``ids`` (its prompt id, value and max) that
    ``recv(timeout)`` (the socket's next message) brings before ``deadline``. None
    once one of them ended, or when no message shows one executing within
    HINT_SECONDS of the server's first ``status`` (it is queued behind others), or
    by the deadline."""
    running = False
    hint_by: float | None = None
    while True:
        now = time.monotonic()
        wait = deadline - now
        if not running and hint_by is not None:
            wait = min(wait, hint_by - now)
        if wait <= 0:
            return None
        try:
            message = parse_message(recv(wait))
        except TimeoutError:
            return None
        if message is None:
            continue
        kind, body = message
        prompt_id = body.get("prompt_id")
        if kind == "status":  # the first: what follows at once says whether ours runs
            if hint_by is None:
                hint_by = time.monotonic() + HINT_SECONDS
            continue
        if prompt_id is not None and prompt_id not in ids:
            continue  # another client's prompt, broadcast
        sighting = _sighting(kind, body)
        if sighting is not None:
            return sighting
        if kind in _ENDED or (kind == "executing" and body.get("node") is None):
            return None  # done: its history says how
        running = running or kind in _RUNNING


def _sighting(kind: str, body: dict[str, Any]) -> tuple[str, int, int] | None:
    """A ``progress`` message's prompt id, value and max, where they make sense."""
    if kind != "progress":
        return None
    prompt_id, value, most = body.get("prompt_id"), body.get("value"), body.get("max")
    if not isinstance(prompt_id, str) or isinstance(value, bool) or isinstance(most, bool):
        return None
    if not isinstance(value, int | float) or not isinstance(most, int | float):
        return None
    if most <= 0 or not 0 <= value <= most:
        return None
    return prompt_id, int(value), int(most)


def call_progress(ids: Sequence[str], prompt_id: str, value: int, most: int) -> tuple[int, int]:
    """A prompt's ``value`` of ``most`` steps as the call's: its prompts run one after
    another (a prompt per image), those before it done."""
    index = list(ids).index(prompt_id)
    return index * most + value, len(ids) * most


def _ws_url(spec: UpstreamModel, client_id: Any) -> str | None:
    """The websocket of ``client_id`` on the server's own origin (from base_url)."""
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
        return None
    base = _base(spec)
    scheme, sep, rest = base.partition("://")
    schemes = {"http": "ws", "https": "wss"}
    if not sep or scheme.lower() not in schemes:
        return None
    return f"{schemes[scheme.lower()]}://{rest}/ws?{urlencode({'clientId': client_id})}"


# --- answers -----------------------------------------------------------------------


def _queued(answer: dict[str, Any], seed: int, count: int) -> dict[str, Any]:
    prompt_id = answer.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise TransientProviderError(
            "ComfyUI queued the workflow without answering its prompt_id",
            code="upstream_bad_response",
        )
    node_errors = answer.get("node_errors")
    if isinstance(node_errors, dict) and node_errors:
        # Queued anyway: some outputs were valid; the others are left out.
        log.warning("ComfyUI prompt %s: outputs left out: %s", prompt_id, _node_errors(node_errors))
    number = answer.get("number")
    return {
        "prompt_id": prompt_id,
        "number": number if isinstance(number, int | float) else None,
        "seed": seed,
        "images": count,
    }


def _prompts(ref: dict[str, Any]) -> list[dict[str, Any]]:
    prompts = ref.get("prompts")
    if not isinstance(prompts, list) or not all(
        isinstance(p, dict) and isinstance(p.get("prompt_id"), str) for p in prompts
    ):
        raise PermanentProviderError(
            "the recorded ComfyUI job names no prompts", code="upstream_bad_response"
        )
    return prompts


def _outputs(prompt: dict[str, Any], entry: dict[str, Any]) -> list[dict[str, str]]:
    """A run prompt's images (filename, subfolder, type), the ``count`` first of
    those saved (type ``output``; previews only where nothing was saved), in node id
    order; raises for a failed run."""
    status = entry.get("status")
    if isinstance(status, dict) and status.get("status_str") == "error":
        raise _failure(str(prompt["prompt_id"]), status.get("messages"))
    outputs = entry.get("outputs")
    if not isinstance(outputs, dict):
        outputs = {}
    images: list[dict[str, str]] = []
    for node in sorted(outputs, key=_node_order):
        found = outputs[node].get("images") if isinstance(outputs[node], dict) else None
        for image in found if isinstance(found, list) else []:
            if isinstance(image, dict) and isinstance(image.get("filename"), str):
                images.append(
                    {
                        "filename": image["filename"],
                        "subfolder": str(image.get("subfolder") or ""),
                        "type": str(image.get("type") or "output"),
                    }
                )
    saved = [image for image in images if image["type"] == "output"] or images
    count = int(prompt.get("images") or 1)
    if len(saved) < count:
        raise PermanentProviderError(
            f"the ComfyUI workflow made {len(saved)} images for {count} asked (does it "
            "end in a SaveImage node?)",
            code="upstream_bad_response",
        )
    return saved[:count]


def _node_order(node: str) -> tuple[int, int, str]:
    return (0, int(node), "") if node.isdigit() else (1, 0, node)


def _failure(prompt_id: str, messages: Any) -> ProviderError:
    """A failed run as the provider error it means: out of memory or interrupted is
    transient (a retry queues it again), an execution error permanent."""
    for message in messages if isinstance(messages, list) else []:
        if not (isinstance(message, list | tuple) and len(message) == 2):
            continue
        event, data = message
        if not isinstance(data, dict):
            continue
        node = f"node {data.get('node_id')} ({data.get('node_type')})"
        if event == "execution_error":
            kind = str(data.get("exception_type") or "error")
            text = str(data.get("exception_message") or "").strip()
            summary = _bounded(f"ComfyUI failed at {node}: {kind}: {text}")
            if _OOM.search(kind) or _OOM.search(text):
                return TransientProviderError(summary, code="out_of_memory")
            return PermanentProviderError(summary, code="upstream_error")
        if event == "execution_interrupted":
            return TransientProviderError(
                f"ComfyUI interrupted prompt {prompt_id} at {node}", code="upstream_unavailable"
            )
    return TransientProviderError(
        f"ComfyUI reported prompt {prompt_id} failed", code="upstream_error"
    )


def _refusal(response: httpx.Response, content: bytes) -> ProviderError:
    """An error answer: a workflow refused (400, naming the node) or anything else
    4xx permanent; 429 and 5xx (a proxy's) transient, with their Retry-After."""
    status = response.status_code
    body: Any = None
    with contextlib.suppress(ValueError):
        body = json.loads(content)
    if isinstance(body, dict) and ("error" in body or "node_errors" in body):
        message = _refused(body)
    else:
        message = content[:MAX_MESSAGE_CHARS].decode(errors="replace") or response.reason_phrase
    message = _bounded(f"ComfyUI answered {status}: {message}")
    if status in _TRANSIENT_STATUS:
        return TransientProviderError(
            message,
            code="upstream_rate_limited" if status == 429 else "upstream_unavailable",
            retry_after=_retry_after(response),
        )
    if status in (401, 403):
        return PermanentProviderError(message, code="upstream_auth_error")
    return PermanentProviderError(message, code="upstream_rejected")


def _refused(body: dict[str, Any]) -> str:
    """``/prompt``'s 400: its error and each node's."""
    error = body.get("error")
    if isinstance(error, dict):
        text = str(error.get("message") or error.get("type") or "refused")
        details = error.get("details")
        if details and not body.get("node_errors"):
            text += f": {details}"
    else:
        text = str(error or "refused")
    nodes = body.get("node_errors")
    if isinstance(nodes, dict) and nodes:
        text += "; " + _node_errors(nodes)
    return text


def _node_errors(nodes: dict[str, Any]) -> str:
    parts = []
    for node_id, node in nodes.items():
        if not isinstance(node, dict):
            continue
        reasons = [
            f"{e.get('message')}: {e.get('details')}" if e.get("details") else str(e.get("message"))
            for e in node.get("errors") or []
            if isinstance(e, dict)
        ]
        parts.append(f"node {node_id} ({node.get('class_type')}): {'; '.join(reasons)}")
    return "; ".join(parts)


def _ids(items: Any) -> set[str]:
    """The prompt ids of /queue's items (``[number, prompt_id, prompt, extra_data,
    outputs]``)."""
    if not isinstance(items, list):
        return set()
    return {str(item[1]) for item in items if isinstance(item, list) and len(item) > 1}


def _bounded(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def _base(spec: UpstreamModel) -> str:
    if not spec.base_url:
        raise PermanentProviderError(
            f"model '{spec.name}' (comfyui) has no base_url", code="provider_misconfigured"
        )
    return spec.base_url.rstrip("/")


def _headers(spec: UpstreamModel) -> dict[str, str]:
    """A proxy's credentials where the entry names some (ComfyUI has none)."""
    if not spec.api_key_env:
        return {}
    key = spec.api_key()
    if not key:
        raise PermanentProviderError(
            f"model '{spec.name}': ${spec.api_key_env} is not set", code="provider_misconfigured"
        )
    return {"Authorization": f"Bearer {key}"}
