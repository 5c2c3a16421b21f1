"""ComfyUI models (provider: comfyui) through the `openai` package, in-process, the
server the fake (tests/support/fakes/comfyui.py), the workflow a file beside the
models file named by a relative path: a batch queued once and looked at until run,
n images either way (one prompt with a batch size, or a prompt per image with its
own seed), both response formats from our storage, a workflow the server refuses
answered as our error naming the node and not retried, a proxy's 503 retried, and
a canceled job's prompt deleted from the server's queue; a waiting job showing its
sampler's step (ComfyUI's websocket) through its deferrals and ending at the last;
an edit through /v1/images/edits, its image and mask uploaded once and loaded by
the workflow's LoadImage and LoadImageMask nodes."""

from __future__ import annotations

import base64
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from PIL import Image

from shared.core.settings import get_settings
from shared.providers.comfyui import ComfyUIProvider
from shared.registry import get_registry
from tests.service.conftest import Service
from tests.support.fakes.comfyui import (
    EDIT_INPUTS,
    EDIT_WORKFLOW_FILE,
    INPUTS,
    WORKFLOW_FILE,
    FakeComfyUI,
    load_workflow,
)
from tests.support.stack import models_yaml
from worker import upstream_jobs

NO_N = {k: v for k, v in INPUTS.items() if k != "n"}


@pytest.fixture(scope="module")
def edit_fake() -> Iterator[FakeComfyUI]:
    """A server whose workflow inpaints (the ``comfy-edit`` model's)."""
    server = FakeComfyUI(load_workflow(EDIT_WORKFLOW_FILE), EDIT_INPUTS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fake(
    service: Service, edit_fake: FakeComfyUI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FakeComfyUI]:
    """The fake server, the registry with its models besides the usual ones and
    retries spaced closely; all undone after."""
    server = FakeComfyUI().start()
    home = Path(tmp_path_factory.mktemp("comfyui"))
    shutil.copy(WORKFLOW_FILE, home / "basic.json")
    shutil.copy(EDIT_WORKFLOW_FILE, home / "inpaint.json")
    common = {"provider": "comfyui", "base_url": server.base_url, "workflow": "basic.json"}
    models = models_yaml("http://127.0.0.1:9/v1")
    models["models"] += [
        {
            "name": "comfy-sd15",
            **common,
            "workflow_inputs": INPUTS,
            "poll_seconds": 0.05,
            "capabilities": {
                "sizes": ["64x64", "96x64"],
                "max_n": 4,
                "upstream_max_n": 4,
                "seed": True,
            },
        },
        {
            "name": "comfy-one-a-call",
            **common,
            "workflow_inputs": NO_N,
            "poll_seconds": 0.05,
            "capabilities": {"sizes": ["64x64"], "max_n": 4, "upstream_max_n": 1, "seed": True},
        },
        {
            "name": "comfy-edit",
            "provider": "comfyui",
            "base_url": edit_fake.base_url,
            "workflow": "inpaint.json",
            "workflow_inputs": EDIT_INPUTS,
            "poll_seconds": 0.05,
            "capabilities": {"sizes": ["64x64"], "max_n": 2, "seed": True, "edits": True},
        },
    ]
    path = home / "models.yaml"
    path.write_text(yaml.safe_dump(models))
    patch = pytest.MonkeyPatch()
    patch.setenv("IMAGEGEN_MODELS_FILE", str(path))
    patch.setenv("IMAGEGEN_PROVIDER_BACKOFF_SECONDS", "0.05")
    get_registry.cache_clear()
    get_settings.cache_clear()
    yield server
    ComfyUIProvider.shared().client.close()  # the process's client, made on first use
    patch.undo()
    get_registry.cache_clear()
    get_settings.cache_clear()
    server.stop()


@pytest.fixture
def api(service: Service, fake: FakeComfyUI) -> Iterator[openai.OpenAI]:
    fake.pending_polls = 2
    with openai.OpenAI(
        api_key=service.key_a,
        base_url="http://service.test/v1",
        http_client=service.client(),
        max_retries=0,
    ) as client:
        yield client


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_a_batch_is_queued_once_and_looked_at_until_run(
    api: openai.OpenAI, fake: FakeComfyUI
) -> None:
    prompt = "a lighthouse at dusk"
    result = api.images.generate(
        model="comfy-sd15",
        prompt=prompt,
        n=3,
        size="96x64",
        response_format="b64_json",
        extra_body={"seed": 1234},
    )
    assert result.data is not None
    assert [_size(base64.b64decode(item.b64_json or "")) for item in result.data] == [(96, 64)] * 3
    (body,) = fake.workflows_for(prompt)  # one prompt, a batch of 3
    graph = body["prompt"]
    assert graph["6"]["inputs"]["text"] == prompt
    assert (graph["3"]["inputs"]["seed"], graph["5"]["inputs"]["batch_size"]) == (1234, 3)
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (96, 64)


def test_one_a_call_fans_out_with_a_seed_each_and_urls_are_our_own(
    service: Service, api: openai.OpenAI, fake: FakeComfyUI
) -> None:
    prompt = "a harbour, one a call"
    result = api.images.generate(
        model="comfy-one-a-call", prompt=prompt, n=2, size="64x64", extra_body={"seed": 70}
    )
    assert result.data is not None
    submitted = fake.workflows_for(prompt)
    assert sorted(w["prompt"]["3"]["inputs"]["seed"] for w in submitted) == [70, 71]
    client = service.client()
    for item in result.data:
        assert item.url is not None
        assert item.url.startswith("http://service.test/")
        assert fake.base_url not in item.url
        assert _size(client.get(item.url).content) == (64, 64)


def test_a_workflow_the_server_refuses_names_the_node_and_is_not_retried(
    api: openai.OpenAI, fake: FakeComfyUI
) -> None:
    fake.checkpoints = []  # the server lacks the workflow's checkpoint
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            api.images.generate(model="comfy-sd15", prompt="a refused one", size="64x64")
    finally:
        fake.checkpoints = ["v1-5-pruned-emaonly.safetensors"]
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "upstream_rejected"
    assert "node 4 (CheckpointLoaderSimple): Value not in list" in error["message"]
    refused = [b for b in fake.refused if "a refused one" in str(b)]
    assert len(refused) == 1


def test_a_proxys_503_is_retried(api: openai.OpenAI, fake: FakeComfyUI) -> None:
    prompt = "[503-once] a busy box"
    result = api.images.generate(
        model="comfy-sd15", prompt=prompt, size="64x64", response_format="b64_json"
    )
    assert result.data is not None
    assert len(result.data) == 1
    assert fake.markers["[503-once]"] == 2  # refused once, then queued
    assert len(fake.workflows_for(prompt)) == 1


def test_a_canceled_job_deletes_its_queued_prompt_or_interrupts_its_running_one(
    service: Service, fake: FakeComfyUI
) -> None:
    fake.pending_polls = 10**6
    texts = ("the first long one", "the second long one")
    client = service.client()
    jobs = [
        client.post(
            "/v1/images/generations",
            headers={"Prefer": "respond-async"},
            json={"model": "comfy-sd15", "prompt": text, "size": "64x64"},
        ).json()
        for text in texts
    ]
    deadline = time.monotonic() + 10
    while sum(len(fake.workflows_for(text)) for text in texts) < 2:
        assert time.monotonic() < deadline, "never submitted"
        time.sleep(0.02)
    with fake.lock:
        running, pending = fake.queue()
    assert len(running) == len(pending) == 1
    job_of = {text: job for text, job in zip(texts, jobs, strict=True)}
    # The one behind first (else it would run next), then the running one.
    ordered = [job_of[p.graph["6"]["inputs"]["text"]] for p in (*pending, *running)]
    for job in ordered:
        canceled = client.post(f"/v1/images/jobs/{job['id']}/cancel").json()
        assert canceled["status"] == "canceled"
        assert upstream_jobs.cancel(job["id"]) == 1  # the cancel_upstream task's body
    assert fake.interrupts == [running[0].id]
    assert fake.deleted == [pending[0].id]
    assert fake.queue() == ([], [])
    assert [len(fake.workflows_for(text)) for text in texts] == [1, 1]  # never twice


def test_a_waiting_job_shows_its_samplers_step_until_it_ends_at_the_last(
    service: Service, fake: FakeComfyUI
) -> None:
    fake.pending_polls = 10**6  # it runs until told
    client = service.client()
    job = client.post(
        "/v1/images/generations",
        headers={"Prefer": "respond-async"},
        json={"model": "comfy-sd15", "prompt": "a slow sampler", "size": "64x64"},
    ).json()
    path = f"/v1/images/jobs/{job['id']}"
    seen: list[Any] = []
    deadline = time.monotonic() + 10
    while len({p["step"] for p in seen if p}) < 4:  # looked at again and again
        assert time.monotonic() < deadline, f"no progress: {seen[-5:]}"
        body = client.get(path).json()
        assert body["status"] in ("queued", "running")
        seen.append(body.get("progress"))
        time.sleep(0.01)
    shown = seen[next(i for i, p in enumerate(seen) if p) :]
    # Never lost between looks: each look is a new claim of the job, queued meanwhile.
    assert None not in shown
    assert [p["steps"] for p in shown] == [20] * len(shown)
    steps = [p["step"] for p in shown]
    assert steps == sorted(steps)
    fake.pending_polls = 0  # now it runs
    done = service.wait_for(path, lambda b: b["status"] == "succeeded")
    assert done["status"] == "succeeded"
    assert done["progress"] == {"step": 20, "steps": 20}
    assert len(fake.workflows_for("a slow sampler")) == 1


def test_an_edit_uploads_its_image_and_mask_once_and_the_workflow_loads_them(
    api: openai.OpenAI, edit_fake: FakeComfyUI
) -> None:
    image, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (80, 48), (10, 120, 200)).save(image, format="PNG")
    Image.new("RGBA", (80, 48), (0, 0, 0, 0)).save(mask, format="PNG")
    result = api.images.edit(
        model="comfy-edit",
        image=("door.png", image.getvalue(), "image/png"),
        mask=("mask.png", mask.getvalue(), "image/png"),
        prompt="a red door",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 5},
    )
    assert result.data is not None
    sizes = [_size(base64.b64decode(item.b64_json or "")) for item in result.data]
    assert sizes == [(80, 48)] * 2  # made from the uploaded image
    assert [u["data"] for u in edit_fake.uploads] == [image.getvalue(), mask.getvalue()]
    names = [f"imagegen/{u['name']}" for u in edit_fake.uploads]
    bodies = edit_fake.workflows_for("a red door")  # one call: a prompt per image
    assert [b["prompt"]["3"]["inputs"]["seed"] for b in bodies] == [5, 6]
    for body in bodies:
        graph = body["prompt"]
        assert [graph["10"]["inputs"]["image"], graph["11"]["inputs"]["image"]] == names
