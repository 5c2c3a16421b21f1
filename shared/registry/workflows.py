"""``comfyui`` entries' workflows: a JSON file in ComfyUI's API format (what its UI
saves with "Export (API)"), and which node input takes each of the request's fields.

The API format is one object of nodes by id, each ``{"class_type": ..., "inputs":
{...}}`` (ComfyUI's ``script_examples/basic_api_example.py``); the UI's own format (a
``nodes`` list and ``links``) cannot be queued and is refused by name. A workflow is
read once per process (``load_workflow``); a relative path is resolved against the
models file's folder when the registry loads it (``resolve_paths``), else against the
working directory. ``workflow_problem`` checks, at load, that every node input
``workflow_inputs`` names exists, so a mistake is refused in one line naming the
entry instead of failing each job. An edit's inputs go to the nodes ComfyUI loads
images with: ``image`` a ``LoadImage`` node's ``image`` (the uploaded file's name),
``mask`` a ``LoadImageMask`` node's (channel ``alpha``) or another ``LoadImage``'s,
whose MASK output is the mask: both read a transparent pixel as 1, "edit here", as
our masks mean it.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.registry.entries import UpstreamModel

# The request's fields a workflow input may take, and how: ``prompt`` (required) the
# prompt's text; ``seed`` the image's seed; ``width``/``height`` from the size;
# ``n`` the images of one call (a batch size); ``steps`` is checked but set by no
# request field yet (the workflow's own value is used); ``image`` and ``mask`` an
# edit's image and mask, uploaded to the server (the name it answers is set).
FIELDS = ("prompt", "seed", "width", "height", "steps", "n", "image", "mask")
# The node classes that may take an edit's uploaded files, by field (nodes.py's
# LoadImage and LoadImageMask: an ``image`` input naming a file in the input folder).
LOADERS = {"image": ("LoadImage",), "mask": ("LoadImageMask", "LoadImage")}
# ComfyUI's node ids are strings; a link is [node_id, output_index].
Workflow = dict[str, dict[str, Any]]


class WorkflowError(ValueError):
    """A workflow file that cannot be used (the message says why, without the path's
    entry: the caller names it)."""


@lru_cache(maxsize=64)
def _read(path: str) -> Workflow:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"workflow: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"workflow: {path} cannot be read: {exc}") from None
    except ValueError as exc:
        raise WorkflowError(f"workflow: {path} is not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise WorkflowError(
            f"workflow: {path} is in ComfyUI's UI format; save it in the API format "
            "(Workflow > Export (API))"
        )
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"workflow: {path} is not a workflow in ComfyUI's API format")
    for node_id, node in data.items():
        if (
            not isinstance(node, dict)
            or not isinstance(node.get("class_type"), str)
            or not isinstance(node.get("inputs"), dict)
        ):
            raise WorkflowError(
                f"workflow: {path}: node {node_id!r} has no class_type and inputs "
                "(not ComfyUI's API format)"
            )
    return data


def load_workflow(path: str) -> Workflow:
    """The workflow at ``path`` (read once per process), as a copy the caller may
    change."""
    return copy.deepcopy(_read(str(path)))


def target(path: str) -> tuple[str, str]:
    """``"6.text"`` as (node id, input name)."""
    node, sep, name = path.partition(".")
    return node, name if sep else ""


def workflow_problem(workflow_path: str, inputs: dict[str, str]) -> str | None:
    """What is wrong with a comfyui upstream's workflow and its ``workflow_inputs``,
    in the models file's words; None when it can be used."""
    unknown = sorted(set(inputs) - set(FIELDS))
    if unknown:
        return (
            f"workflow_inputs: {unknown[0]!r} is not one of the request's fields "
            f"({', '.join(FIELDS)})"
        )
    if "prompt" not in inputs:
        return "workflow_inputs: prompt: which node input takes the prompt is required"
    try:
        workflow = _read(str(workflow_path))
    except WorkflowError as exc:
        return str(exc)
    for field, where in inputs.items():
        node_id, name = target(where)
        if not node_id or not name:
            return f"workflow_inputs: {field}: {where!r} is not NODE_ID.INPUT_NAME (e.g. '6.text')"
        node = workflow.get(node_id)
        if node is None:
            return f"workflow_inputs: {field}: the workflow has no node {node_id!r}"
        if name not in node["inputs"]:
            return (
                f"workflow_inputs: {field}: node {node_id!r} ({node['class_type']}) has no "
                f"input {name!r}"
            )
        if isinstance(node["inputs"][name], list):
            return (
                f"workflow_inputs: {field}: input {where!r} is a link to another node, not a value"
            )
        problem = _loader_problem(field, node_id, name, node)
        if problem:
            return problem
    if "mask" in inputs and "image" not in inputs:
        return "workflow_inputs: mask: a mask needs the image it masks (map image too)"
    return None


def _loader_problem(field: str, node_id: str, name: str, node: dict[str, Any]) -> str | None:
    """An edit's file mapped anywhere but the ``image`` input of a node that loads
    one; a LoadImageMask reading another channel than the alpha our masks use."""
    loaders = LOADERS.get(field)
    if loaders is None:
        return None
    if node["class_type"] not in loaders or name != "image":
        return (
            f"workflow_inputs: {field}: takes the image input of a "
            f"{' or '.join(loaders)} node, not {node_id}.{name} ({node['class_type']})"
        )
    channel = node["inputs"].get("channel", "alpha")
    if node["class_type"] == "LoadImageMask" and channel != "alpha":
        return (
            f"workflow_inputs: mask: node {node_id!r} (LoadImageMask) reads channel "
            f"{channel!r}; our masks mark what to edit by transparency: use 'alpha'"
        )
    return None


def entry_problem(spec: UpstreamModel) -> str | None:
    """A comfyui entry's (or deployment's) workflow problem, naming the deployment
    where the entry has several."""
    for upstream in spec.upstreams():
        if upstream.provider != "comfyui" or not upstream.workflow:
            continue
        problem = workflow_problem(upstream.workflow, upstream.workflow_inputs) or _edit_problem(
            spec, upstream.workflow_inputs
        )
        if problem:
            where = f"deployment {upstream.id!r}: " if spec.deployments else ""
            return f"{where}{problem}"
    return None


def _edit_problem(spec: UpstreamModel, inputs: dict[str, str]) -> str | None:
    """A model that serves edits needs a workflow that takes an image, and a
    workflow that takes one serves nothing else (it cannot run without it)."""
    edits = spec.capabilities.edits
    if edits and "image" not in inputs:
        return (
            "workflow_inputs: image: a model with capabilities.edits needs the LoadImage "
            "node input that takes the edit's image"
        )
    if "image" in inputs and not edits:
        return (
            "workflow_inputs: image: the workflow edits an image; set capabilities.edits: "
            "true (it serves /v1/images/edits only)"
        )
    if spec.capabilities.variations:
        return "capabilities.variations: a comfyui workflow serves generations or edits"
    return None


def resolve_paths(entry: Any, folder: Path) -> None:
    """Make a models file's entry's relative ``workflow`` paths (its own and its
    deployments') absolute against ``folder``, the models file's."""
    if not isinstance(entry, dict):
        return
    deployments = entry.get("deployments")
    upstreams = [entry, *(deployments if isinstance(deployments, list) else [])]
    for upstream in upstreams:
        if isinstance(upstream, dict) and isinstance(upstream.get("workflow"), str):
            path = Path(upstream["workflow"]).expanduser()
            if not path.is_absolute():
                upstream["workflow"] = str(folder / path)
