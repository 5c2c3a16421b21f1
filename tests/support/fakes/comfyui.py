"""A fake ComfyUI server speaking its HTTP API over HTTP on 127.0.0.1.

It follows ComfyUI's own repository (github.com/comfyanonymous/ComfyUI):
``server.py``'s routes, ``execution.py``'s ``validate_prompt`` and ``PromptQueue``,
``script_examples/basic_api_example.py`` and ``websockets_api_example.py``, and the
routes page https://docs.comfy.org/development/comfyui-server/comms_routes:

- ``POST /prompt`` ``{"prompt": <API-format workflow>, "client_id"}``: the workflow
  validated as ComfyUI does for the nodes it knows (CheckpointLoaderSimple,
  CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage, PreviewImage:
  their required inputs, INT bounds, combo lists, links to existing nodes, at least
  one output node), answered ``{"prompt_id", "number", "node_errors": {}}``; a
  refused one 400 ``{"error": {"type", "message", "details", "extra_info"},
  "node_errors": {node_id: {"errors": [...], "dependent_outputs", "class_type"}}}``
  (an unknown class or no outputs: ``error`` alone, ``node_errors`` ``{}``).
- ``GET /history/{prompt_id}``: ``{}`` until the prompt has run, then ``{prompt_id:
  {"prompt": [number, id, prompt, extra_data, outputs], "outputs": {node_id:
  {"images": [{"filename", "subfolder", "type"}]}}, "status": {"status_str",
  "completed", "messages": [[event, data], ...]}, "meta": {...}}}``.
- ``GET /prompt``: ``{"exec_info": {"queue_remaining"}}``; ``GET /queue``:
  ``{"queue_running": [...], "queue_pending": [...]}`` of ``[number, prompt_id,
  prompt, extra_data, outputs]``; ``POST /queue`` ``{"delete": [...]}`` or
  ``{"clear": true}``; ``POST /interrupt`` (``{"prompt_id"}`` interrupts that prompt
  only while it runs; no body, whatever runs); each answers 200 with no body.
- ``GET /view?filename=&subfolder=&type=``: the image; 400 for a filename starting
  with ``/`` or holding ``..``, 404 for one it does not have.
- ``POST /upload/image``: multipart ``image`` (a file, its filename the name) with
  ``type`` (``input`` unless given), ``subfolder``, ``overwrite``; a name taken by
  other bytes becomes ``name (1).ext`` unless ``overwrite`` is ``true``/``1``, the
  same bytes again are the same file (``image_upload``); answered ``{"name",
  "subfolder", "type"}``; no file, or a subfolder leaving the input folder, 400.
  LoadImage and LoadImageMask nodes must name an uploaded file (``subfolder/name``;
  ``example.png`` is there from the start, as in ComfyUI's input folder), else the
  node's ``custom_validation_failed: Invalid image file``; an edit's latent from a
  VAEEncode(ForInpaint) of a LoadImage makes images of that file's size.
- ``GET /ws?clientId=``: a websocket (RFC 6455, enough of it: the handshake, text
  and binary frames out, a close or ping in). On connecting: ``{"type": "status",
  "data": {"status": {"exec_info": {"queue_remaining"}}, "sid"}}``; to the client
  whose prompt runs, then ``{"type": "executing", "data": {"node"}}`` (server.py's
  websocket_handler on a reconnect), a binary preview frame, and ``{"type":
  "progress", "data": {"value", "max", "prompt_id", "node"}}`` (main.py's progress
  hook): the sampler at step ``looks`` (at least 1, below its ``steps`` until it
  has run) of its ``steps`` input. ``ws_refused`` answers 404 (a proxy without
  websockets); ``sockets`` lists each connection's client id and Authorization.
- Every route also under ``/api`` (as ``server.py`` adds them).

A prompt is queued until looked at: its history stays ``{}`` for ``pending_polls``
looks at ``/history/{id}`` (the first prompt not run is "running", the others
pending, in ``/queue``), then it runs. ``lose()`` forgets everything (a restart).

What a test checks: ``submits`` counts accepted ``POST /prompt`` calls (refused
ones in ``refused``), ``workflows`` holds each accepted body, ``deleted`` and
``interrupts`` what cancels asked. Given the workflow and ``workflow_inputs`` it was
made with, the fake refuses (400, type ``fake_unexpected_input``) a workflow whose
inputs differ from the file's anywhere but where mapped. ComfyUI has no
authentication; ``api_key`` makes the fake stand behind a proxy that requires
``Authorization: Bearer <key>`` (401 otherwise).

Markers in the prompt's text: ``[503-once]`` the proxy's 503 with ``Retry-After: 1``
to the first submit, ``[execution-error]`` the run fails at the KSampler node,
``[oom]`` it runs out of GPU memory there.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import posixpath
import struct
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from tests.support.fake_upstream import _Server

WORKFLOW_FILE = Path(__file__).with_name("comfyui_workflow.json")
# Which node input takes each of the request's fields, in WORKFLOW_FILE.
INPUTS = {
    "prompt": "6.text",
    "seed": "3.seed",
    "width": "5.width",
    "height": "5.height",
    "steps": "3.steps",
    "n": "5.batch_size",
}
# An inpainting workflow (LoadImage, LoadImageMask, VAEEncodeForInpaint) and its
# mapping, the edit's files on the loaders.
EDIT_WORKFLOW_FILE = Path(__file__).with_name("comfyui_edit_workflow.json")
EDIT_INPUTS = {"prompt": "6.text", "seed": "3.seed", "image": "10.image", "mask": "11.image"}
MAX_RESOLUTION = 16384
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
SCHEDULERS = ["normal", "karras", "exponential", "simple"]
# Each node class's inputs (nodes.py's INPUT_TYPES): a link type, ("INT", min, max),
# ("FLOAT", min, max), "STRING", or a combo list (None: the server's checkpoints).
NODES: dict[str, dict[str, Any]] = {
    "CheckpointLoaderSimple": {"ckpt_name": None},
    "CLIPTextEncode": {"text": "STRING", "clip": "CLIP"},
    "EmptyLatentImage": {
        "width": ("INT", 16, MAX_RESOLUTION),
        "height": ("INT", 16, MAX_RESOLUTION),
        "batch_size": ("INT", 1, 4096),
    },
    "KSampler": {
        "model": "MODEL",
        "seed": ("INT", 0, 0xFFFFFFFFFFFFFFFF),
        "steps": ("INT", 1, 10000),
        "cfg": ("FLOAT", 0.0, 100.0),
        "sampler_name": SAMPLERS,
        "scheduler": SCHEDULERS,
        "positive": "CONDITIONING",
        "negative": "CONDITIONING",
        "latent_image": "LATENT",
        "denoise": ("FLOAT", 0.0, 1.0),
    },
    "VAEDecode": {"samples": "LATENT", "vae": "VAE"},
    "SaveImage": {"images": "IMAGE", "filename_prefix": "STRING"},
    "PreviewImage": {"images": "IMAGE"},
    # "FILE": a file in the input folder (their VALIDATE_INPUTS).
    "LoadImage": {"image": "FILE"},
    "LoadImageMask": {"image": "FILE", "channel": ["alpha", "red", "green", "blue"]},
    "VAEEncode": {"pixels": "IMAGE", "vae": "VAE"},
    "VAEEncodeForInpaint": {
        "pixels": "IMAGE",
        "vae": "VAE",
        "mask": "MASK",
        "grow_mask_by": ("INT", 0, 64),
    },
}
OUTPUT_NODES = {"SaveImage", "PreviewImage"}
LINK_TYPES = {"CLIP", "MODEL", "CONDITIONING", "LATENT", "VAE", "IMAGE", "MASK"}


def load_workflow(path: Path = WORKFLOW_FILE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def png(width: int, height: int, seed: int) -> bytes:
    colour = (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def _error(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


@dataclass
class Reply:
    status: int
    data: Any = None
    ctype: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class _Prompt:
    def __init__(self, number: int, prompt_id: str, graph: dict[str, Any], extra: Any) -> None:
        self.number, self.id, self.graph, self.extra = number, prompt_id, graph, extra
        self.outputs = sorted(n for n, node in graph.items() if node["class_type"] in OUTPUT_NODES)
        self.looks = 0
        self.history: dict[str, Any] | None = None
        self.deleted = False

    def item(self) -> list[Any]:
        return [self.number, self.id, self.graph, self.extra, self.outputs]


class FakeComfyUI:
    def __init__(
        self,
        workflow: dict[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.workflow = workflow if workflow is not None else load_workflow()
        self.inputs = dict(INPUTS if inputs is None else inputs)
        self.api_key = api_key
        self.pending_polls = 2
        self.checkpoints = ["v1-5-pruned-emaonly.safetensors"]
        self.submits = 0
        self.refused: list[dict[str, Any]] = []
        self.workflows: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.interrupts: list[str | None] = []
        self.unauthorized = 0
        self.markers: Counter[str] = Counter()
        self.prompts: dict[str, _Prompt] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        # The input folder: "subfolder/name" (or "name") -> bytes; what was uploaded.
        self.inputs_folder: dict[str, bytes] = {"example.png": png(64, 64, 0)}
        self.uploads: list[dict[str, Any]] = []
        self.ws_refused = False
        self.sockets: list[tuple[str, str | None]] = []
        self._number = 0
        self._counter = 0
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> FakeComfyUI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def lose(self) -> None:
        """Forget every prompt and its history, as a restarted server does."""
        with self.lock:
            self.prompts.clear()

    def workflows_for(self, text: str) -> list[dict[str, Any]]:
        """The accepted workflows whose prompt text holds ``text``."""
        node, name = self.inputs["prompt"].split(".")
        return [w for w in self.workflows if text in str(w["prompt"][node]["inputs"][name])]

    # --- the queue -----------------------------------------------------------------

    def _waiting(self) -> list[_Prompt]:
        return [p for p in self.prompts.values() if p.history is None and not p.deleted]

    def queue(self) -> tuple[list[_Prompt], list[_Prompt]]:
        """(running, pending): the first prompt not run runs, one at a time."""
        waiting = self._waiting()
        return waiting[:1], waiting[1:]

    def _look(self, prompt: _Prompt) -> None:
        if prompt.history is not None or prompt.deleted:
            return
        prompt.looks += 1
        if prompt.looks > self.pending_polls:
            self._run(prompt)

    def _run(self, prompt: _Prompt, interrupted: bool = False) -> None:
        graph = prompt.graph
        text = " ".join(
            str(node["inputs"].get("text", ""))
            for node in graph.values()
            if node["class_type"] == "CLIPTextEncode"
        )
        sampler = next(n for n, node in graph.items() if node["class_type"] == "KSampler")
        messages: list[list[Any]] = [["execution_start", {"prompt_id": prompt.id}]]
        messages.append(["execution_cached", {"nodes": [], "prompt_id": prompt.id}])
        where = {
            "prompt_id": prompt.id,
            "node_id": sampler,
            "node_type": "KSampler",
            "executed": [],
        }
        failure: list[Any] | None = None
        if interrupted:
            failure = ["execution_interrupted", where]
        elif "[execution-error]" in text or "[oom]" in text:
            kind, message = (
                ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB")
                if "[oom]" in text
                else ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied (77x768)")
            )
            failure = [
                "execution_error",
                {
                    **where,
                    "exception_message": message,
                    "exception_type": kind,
                    "traceback": ['  File "execution.py", line 1, in execute\n'],
                    "current_inputs": {},
                    "current_outputs": [],
                },
            ]
        outputs: dict[str, Any] = {}
        if failure is not None:
            messages.append(failure)
        else:
            width, height, batch = self._latent(graph, graph[sampler]["inputs"]["latent_image"])
            seed = int(graph[sampler]["inputs"]["seed"])
            for node_id in prompt.outputs:
                node = graph[node_id]
                saved = node["class_type"] == "SaveImage"
                images = []
                for index in range(batch):
                    self._counter += 1
                    prefix = node["inputs"].get("filename_prefix", "ComfyUI") if saved else "tmp"
                    image = {
                        "filename": f"{prefix}_{self._counter:05}_.png",
                        "subfolder": "",
                        "type": "output" if saved else "temp",
                    }
                    self.files[(image["filename"], "", image["type"])] = png(
                        width, height, seed + index
                    )
                    images.append(image)
                outputs[node_id] = {"images": images}
            messages.append(["execution_success", {"prompt_id": prompt.id}])
        prompt.history = {
            "prompt": prompt.item(),
            "outputs": outputs,
            "status": {
                "status_str": "error" if failure else "success",
                "completed": failure is None,
                "messages": messages,
            },
            "meta": {
                n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                for n in outputs
            },
        }

    def _latent(self, graph: dict[str, Any], link: list[Any]) -> tuple[int, int, int]:
        """A latent's width, height and batch: an empty one's inputs, or an encoded
        image's (a LoadImage's file) size, one image."""
        node = graph[str(link[0])]
        if node["class_type"] == "EmptyLatentImage":
            inputs = node["inputs"]
            return int(inputs["width"]), int(inputs["height"]), int(inputs["batch_size"])
        loader = graph[str(node["inputs"]["pixels"][0])]
        picture = Image.open(io.BytesIO(self.inputs_folder[loader["inputs"]["image"]]))
        return picture.width, picture.height, 1

    # --- validation (execution.py's validate_prompt) -------------------------------

    def validate(self, graph: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """ComfyUI's refusal of ``graph`` (its error and node errors), or None."""
        if not isinstance(graph, dict):
            return _error("invalid_prompt", "Prompt is not a JSON object", ""), {}
        for node_id, node in graph.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return _error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                ), {}
            if node["class_type"] not in NODES:
                return _error(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                ), {}
        outputs = [n for n, node in graph.items() if node["class_type"] in OUTPUT_NODES]
        if not outputs:
            return _error("prompt_no_outputs", "Prompt has no outputs", ""), {}
        node_errors: dict[str, Any] = {}
        for node_id, node in graph.items():
            reasons = self._node_errors(graph, node_id, node)
            if reasons:
                node_errors[node_id] = {
                    "errors": reasons,
                    "dependent_outputs": outputs,
                    "class_type": node["class_type"],
                }
        if node_errors:
            details = "\n".join(
                f"{e['message']}: {e['details']}" for n in node_errors.values() for e in n["errors"]
            )
            return _error(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
            ), node_errors
        return None

    def _node_errors(self, graph: dict[str, Any], node_id: str, node: Any) -> list[Any]:
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            return [_error("invalid_prompt", "Node has no inputs", node_id)]
        errors = []
        for name, kind in NODES[node["class_type"]].items():
            if name not in inputs:
                errors.append(
                    _error(
                        "required_input_missing", "Required input is missing", name, input_name=name
                    )
                )
                continue
            error = self._input_error(graph, name, kind, inputs[name])
            if error is not None:
                errors.append(error)
        return errors

    def _input_error(self, graph: dict[str, Any], name: str, kind: Any, value: Any) -> Any:
        if isinstance(kind, str) and kind in LINK_TYPES:
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph:
                return None
            return _error(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                name,
                input_name=name,
            )
        if kind == "STRING":
            return None if isinstance(value, str) else self._type_error(name, value, "STRING")
        if kind == "FILE":  # LoadImage.VALIDATE_INPUTS, as execution.py reports it
            if isinstance(value, str) and value in self.inputs_folder:
                return None
            return _error(
                "custom_validation_failed",
                "Custom validation failed for node",
                f"{name} - Invalid image file: {value}",
                input_name=name,
            )
        if isinstance(kind, tuple):
            return self._number_error(name, kind, value)
        options = self.checkpoints if kind is None else kind
        if value in options:
            return None
        return _error(
            "value_not_in_list",
            "Value not in list",
            f"{name}: '{value}' not in {options}",
            input_name=name,
        )

    def _number_error(self, name: str, kind: tuple[str, float, float], value: Any) -> Any:
        wanted = int if kind[0] == "INT" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            return self._type_error(name, value, kind[0])
        if value < kind[1]:
            message = f"Value {value} smaller than min of {kind[1]}"
            return _error("value_smaller_than_min", message, name, input_name=name)
        if value > kind[2]:
            message = f"Value {value} bigger than max of {kind[2]}"
            return _error("value_bigger_than_max", message, name, input_name=name)
        return None

    @staticmethod
    def _type_error(name: str, value: Any, kind: str) -> dict[str, Any]:
        return _error(
            "invalid_input_type",
            f"Failed to convert an input value to a {kind} value",
            f"{name}, {value}",
            input_name=name,
        )

    def unexpected(self, graph: dict[str, Any]) -> str | None:
        """Where ``graph`` differs from the workflow file outside the mapped inputs."""
        mapped = {tuple(where.split(".", 1)) for where in self.inputs.values()}
        if set(graph) != set(self.workflow):
            return f"nodes {sorted(graph)} are not the workflow's {sorted(self.workflow)}"
        for node_id, node in self.workflow.items():
            sent = graph[node_id]
            if sent.get("class_type") != node["class_type"]:
                return f"node {node_id}'s class_type changed"
            if set(sent.get("inputs", {})) != set(node["inputs"]):
                return f"node {node_id}'s inputs changed"
            for name, value in node["inputs"].items():
                if (node_id, name) not in mapped and sent["inputs"][name] != value:
                    return f"input {node_id}.{name} changed, and is not mapped"
        return None

    # --- HTTP ----------------------------------------------------------------------

    def get(self, path: str, query: dict[str, str]) -> Reply:
        with self.lock:
            if path.startswith("/history/"):
                prompt = self.prompts.get(path.removeprefix("/history/"))
                if prompt is None:
                    return Reply(200, {})
                self._look(prompt)
                return Reply(200, {} if prompt.history is None else {prompt.id: prompt.history})
            if path == "/prompt":
                return Reply(200, {"exec_info": {"queue_remaining": len(self._waiting())}})
            if path == "/queue":
                running, pending = self.queue()
                return Reply(
                    200,
                    {
                        "queue_running": [p.item() for p in running],
                        "queue_pending": [p.item() for p in pending],
                    },
                )
            if path == "/view":
                return self._view(query)
        return Reply(404, b"404: Not Found", "text/plain")

    def _view(self, query: dict[str, str]) -> Reply:
        filename = query.get("filename")
        if not filename:
            return Reply(404)
        if filename[0] == "/" or ".." in filename:
            return Reply(400)
        data = self.files.get((filename, query.get("subfolder", ""), query.get("type", "output")))
        if data is None:
            return Reply(404)
        return Reply(200, data, "image/png", {"Content-Disposition": f'filename="{filename}"'})

    def post(self, path: str, body: Any) -> Reply:
        if path == "/prompt":
            return self._prompt(body)
        with self.lock:
            if path == "/queue" and isinstance(body, dict):
                if body.get("clear"):
                    for prompt in self.queue()[1]:
                        prompt.deleted = True
                for prompt_id in body.get("delete") or []:
                    self.deleted.append(prompt_id)
                    for prompt in self.queue()[1]:
                        if prompt.id == prompt_id:
                            prompt.deleted = True
                return Reply(200)
            if path == "/interrupt":
                prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
                self.interrupts.append(prompt_id)
                for prompt in self.queue()[0]:
                    if prompt_id is None or prompt.id == prompt_id:
                        self._run(prompt, interrupted=True)
                return Reply(200)
        return Reply(404, b"404: Not Found", "text/plain")

    def _prompt(self, body: Any) -> Reply:
        if not isinstance(body, dict) or "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return Reply(400, {"error": error, "node_errors": {}})
        graph = body["prompt"]
        refusal = self.validate(graph)
        if refusal is None and (problem := self.unexpected(graph)):
            refusal = _error("fake_unexpected_input", problem, problem), {}
        with self.lock:
            if "[503-once]" in json.dumps(graph):
                self.markers["[503-once]"] += 1
                if self.markers["[503-once]"] == 1:
                    return Reply(
                        503, b"503 Service Unavailable", "text/plain", {"Retry-After": "1"}
                    )
            if refusal is not None:
                self.refused.append(body)
                return Reply(400, {"error": refusal[0], "node_errors": refusal[1]})
            self.submits += 1
            self.workflows.append(body)
            self._number += 1
            extra = dict(body.get("extra_data") or {})
            if "client_id" in body:
                extra["client_id"] = body["client_id"]
            prompt_id = str(body.get("prompt_id") or uuid.uuid4())
            self.prompts[prompt_id] = _Prompt(self._number, prompt_id, graph, extra)
            return Reply(200, {"prompt_id": prompt_id, "number": self._number, "node_errors": {}})

    def route(
        self, method: str, path: str, query: dict[str, str], raw: bytes, content_type: str | None
    ) -> Reply:
        if method == "POST" and path == "/upload/image":
            return self.upload(content_type or "", raw)
        if method == "GET":
            return self.get(path, query)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        return self.post(path, body)

    def upload(self, content_type: str, raw: bytes) -> Reply:
        """``POST /upload/image`` (server.py's image_upload)."""
        fields = _multipart(content_type, raw)
        image = fields.get("image")
        if image is None or not image[0]:
            return Reply(400)
        filename, data = image
        kind = (fields.get("type") or ("", b"input"))[1].decode()
        subfolder = (fields.get("subfolder") or ("", b""))[1].decode()
        overwrite = (fields.get("overwrite") or ("", b""))[1].decode() in ("true", "1")
        folder = posixpath.normpath(subfolder) if subfolder else ""
        if folder.startswith(("/", "..")) or "/" in filename or filename in ("", ".", ".."):
            return Reply(400)
        with self.lock:
            name = filename
            stem, dot, ext = filename.rpartition(".")
            stem, ext = (stem, dot + ext) if dot else (filename, "")
            index = 1
            while not overwrite and self._stored(folder, name) not in (None, data):
                name = f"{stem} ({index}){ext}"
                index += 1
            if kind == "input":
                self.inputs_folder[f"{folder}/{name}" if folder else name] = data
            self.uploads.append({"name": name, "subfolder": subfolder, "type": kind, "data": data})
            return Reply(200, {"name": name, "subfolder": subfolder, "type": kind})

    def _stored(self, folder: str, name: str) -> bytes | None:
        return self.inputs_folder.get(f"{folder}/{name}" if folder else name)

    # --- the websocket ---------------------------------------------------------------

    def ws_messages(
        self, client_id: str, authorization: str | None
    ) -> list[dict[str, Any] | bytes]:
        """What the server sends a client on connecting: its status, and to the
        client whose prompt runs, the node running, a preview and the progress."""
        with self.lock:
            self.sockets.append((client_id, authorization))
            running, _ = self.queue()
            status = {"status": {"exec_info": {"queue_remaining": len(self._waiting())}}}
            messages: list[dict[str, Any] | bytes] = [
                {"type": "status", "data": {**status, "sid": client_id}}
            ]
            ours = [p for p in running if p.extra.get("client_id") == client_id]
            if not ours:
                return messages
            prompt = ours[0]
            sampler = next(
                (n for n, node in prompt.graph.items() if node["class_type"] == "KSampler"), None
            )
            if sampler is None:
                return messages
            steps = int(prompt.graph[sampler]["inputs"].get("steps") or 1)
            value = min(max(prompt.looks, 1), max(steps - 1, 1))
        preview = struct.pack(">II", 1, 1) + b"\xff\xd8\xff not a real jpeg"
        return [
            *messages,
            {"type": "executing", "data": {"node": sampler}},
            preview,
            {
                "type": "progress",
                "data": {"value": value, "max": steps, "prompt_id": prompt.id, "node": sampler},
            },
        ]

    def _authorized(self, header: str | None) -> bool:
        if self.api_key is None or header == f"Bearer {self.api_key}":
            return True
        with self.lock:
            self.unauthorized += 1
        return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def _answer(self, method: str) -> None:
                # The body read first, whatever the answer: the connection is kept alive.
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = urlsplit(self.path)
                path = parts.path.removeprefix("/api") or "/"
                query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                authorization = self.headers.get("Authorization")
                if not fake._authorized(authorization):
                    reply = Reply(401, b"401: Unauthorized", "text/plain")
                elif method == "GET" and path == "/ws" and not fake.ws_refused:
                    client_id = query.get("clientId") or uuid.uuid4().hex
                    _serve_websocket(self, fake, client_id, authorization)
                    return
                else:
                    reply = fake.route(method, path, query, raw, self.headers.get("Content-Type"))
                data = reply.data
                if not isinstance(data, bytes):
                    data = b"" if data is None else json.dumps(data).encode()
                self.send_response(reply.status)
                if data:
                    self.send_header("Content-Type", reply.ctype)
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _serve_websocket(
    self: BaseHTTPRequestHandler, fake: FakeComfyUI, client_id: str, authorization: str | None
) -> None:
    """The ``/ws`` route on the handler's connection: the handshake, the messages,
    then frames read until the client closes."""
    key = self.headers.get("Sec-WebSocket-Key")
    if not key or (self.headers.get("Upgrade") or "").lower() != "websocket":
        self.send_error(400)
        return
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest())
    self.send_response(101, "Switching Protocols")
    self.send_header("Upgrade", "websocket")
    self.send_header("Connection", "Upgrade")
    self.send_header("Sec-WebSocket-Accept", accept.decode())
    self.end_headers()
    self.close_connection = True
    messages = fake.ws_messages(client_id, authorization)
    for message in messages:
        if isinstance(message, bytes):
            self.wfile.write(_frame(0x2, message))
        else:
            self.wfile.write(_frame(0x1, json.dumps(message).encode()))
    self.wfile.flush()
    self.connection.settimeout(5)  # a client gone quiet frees the thread
    while True:  # until the client closes (aiohttp answers its close)
        try:
            opcode, payload = _read_frame(self.rfile)
        except (OSError, ValueError):
            return
        if opcode == 0x8:
            self.wfile.write(_frame(0x8, payload[:2]))
            self.wfile.flush()
            return
        if opcode == 0x9:
            self.wfile.write(_frame(0xA, payload))
            self.wfile.flush()


def _frame(opcode: int, payload: bytes) -> bytes:
    """A server's frame (unmasked, final)."""
    size = len(payload)
    if size < 126:
        header = struct.pack(">BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        header = struct.pack(">BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack(">BBQ", 0x80 | opcode, 127, size)
    return header + payload


def _read_frame(stream: Any) -> tuple[int, bytes]:
    """A client's frame (masked): its opcode and payload."""
    head = stream.read(2)
    if len(head) < 2:
        raise ValueError("closed")
    opcode, size = head[0] & 0x0F, head[1] & 0x7F
    if size == 126:
        size = struct.unpack(">H", stream.read(2))[0]
    elif size == 127:
        size = struct.unpack(">Q", stream.read(8))[0]
    mask = stream.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = stream.read(size)
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str, bytes]]:
    """A multipart/form-data body's fields: name -> (filename, content)."""
    _, _, boundary = content_type.partition("boundary=")
    boundary = boundary.split(";")[0].strip().strip('"')
    if not boundary:
        return {}
    fields: dict[str, tuple[str, bytes]] = {}
    for part in raw.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, body = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = next(
            (
                line.decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-disposition")
            ),
            "",
        )
        params = dict(
            (key.strip(), value.strip().strip('"'))
            for key, _, value in (item.partition("=") for item in disposition.split(";")[1:])
        )
        if "name" in params:
            fields[params["name"]] = (params.get("filename", ""), body.removesuffix(b"\r\n"))
    return fields
