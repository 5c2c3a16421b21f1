"""The ``comfyui`` provider against a fake ComfyUI server over HTTP: the workflow
checked at load (its file found beside the models file, every mapped node input
there), the request's fields set where mapped and nowhere else, a prompt per image
or a batch, looked at until it has run, its images fetched from /view, the server's
refusals and failures as provider errors, a lost prompt, and cancel."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from shared.core.errors import PermanentProviderError, TransientProviderError
from shared.jobs.schemas import GenerationParams
from shared.providers.base import Call, Generation, Pending
from shared.providers.comfyui import ComfyUIProvider, PromptLost
from shared.registry import RegistryError, UpstreamModel, load_registry
from tests.support.fakes.comfyui import INPUTS, WORKFLOW_FILE, FakeComfyUI

CAPS = {"sizes": ["64x64", "96x64"], "max_n": 4, "seed": True}
NO_N = {k: v for k, v in INPUTS.items() if k != "n"}


@pytest.fixture
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI().start()
    yield server
    server.stop()


@pytest.fixture
def provider() -> Iterator[ComfyUIProvider]:
    with httpx.Client(timeout=5) as client:
        yield ComfyUIProvider(client)


def _spec(base_url: str, **fields: Any) -> UpstreamModel:
    entry = {
        "name": "comfy",
        "provider": "comfyui",
        "base_url": base_url,
        "workflow": str(WORKFLOW_FILE),
        "workflow_inputs": INPUTS,
        "poll_seconds": 0.01,
        "capabilities": CAPS,
        **fields,
    }
    return UpstreamModel.model_validate(entry)


def _call(spec: UpstreamModel, prompt: str = "a red fox", count: int = 1, **params: Any) -> Call:
    values: dict[str, Any] = {"model": "comfy", "prompt": prompt, "n": count, "size": "64x64"}
    return Call(spec, GenerationParams(**{**values, **params}), count)


def _until_done(provider: ComfyUIProvider, call: Call, ref: dict[str, Any]) -> Generation:
    for _ in range(20):
        answer = provider.poll(call, ref)
        if isinstance(answer, Generation):
            return answer
    raise AssertionError("never done")


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# --- the registry --------------------------------------------------------------------


def _load(tmp_path: Path, **fields: Any) -> Any:
    entry = {
        "name": "comfy",
        "provider": "comfyui",
        "base_url": "http://comfy.test:8188",
        "workflow": "workflows/basic.json",
        "workflow_inputs": INPUTS,
        "capabilities": CAPS,
        **fields,
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return load_registry(path)


def test_a_relative_workflow_is_the_models_files_neighbour(tmp_path: Path) -> None:
    (tmp_path / "workflows").mkdir()
    shutil.copy(WORKFLOW_FILE, tmp_path / "workflows" / "basic.json")
    spec = _load(tmp_path).get("comfy")
    assert spec.workflow == str(tmp_path / "workflows" / "basic.json")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {**INPUTS, "seed": "30.seed"},
            "model 'comfy': workflow_inputs: seed: the workflow has no node '30'",
        ),
        (
            {**INPUTS, "steps": "3.step"},
            "model 'comfy': workflow_inputs: steps: node '3' (KSampler) has no input 'step'",
        ),
        (
            {**INPUTS, "prompt": "6.clip"},
            "workflow_inputs: prompt: input '6.clip' is a link to another node",
        ),
        (NO_N | {"prompt": "6"}, "workflow_inputs: prompt: '6' is not NODE_ID.INPUT_NAME"),
        ({"seed": "3.seed"}, "workflow_inputs: prompt: which node input takes the prompt"),
        ({**INPUTS, "cfg": "3.cfg"}, "workflow_inputs: 'cfg' is not one of the request's"),
    ],
)
def test_a_mapping_to_no_node_input_is_refused_at_load(
    tmp_path: Path, inputs: dict[str, str], message: str
) -> None:
    (tmp_path / "workflows").mkdir()
    shutil.copy(WORKFLOW_FILE, tmp_path / "workflows" / "basic.json")
    with pytest.raises(RegistryError) as caught:
        _load(tmp_path, workflow_inputs=inputs)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_or_ui_format_workflow_is_refused_at_load_naming_the_deployment(
    tmp_path: Path,
) -> None:
    with pytest.raises(RegistryError, match=r"model 'comfy': workflow: .*basic\.json does not"):
        _load(tmp_path)
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "basic.json").write_text(json.dumps({"nodes": [], "links": []}))
    deployments: list[dict[str, Any]] = [
        {"id": "box-a", "provider": "comfyui", "base_url": "http://a.test", "workflow": "w.json"}
    ]
    shutil.copy(WORKFLOW_FILE, tmp_path / "w.json")
    with pytest.raises(RegistryError) as caught:
        _load(tmp_path, deployments=[*deployments, {**deployments[0], "id": "box-b"}])
    assert "workflow_inputs: prompt" in str(caught.value)  # the deployments map none
    deployments[0]["workflow_inputs"] = INPUTS
    loaded = _load(tmp_path, deployments=deployments)
    assert loaded.get("comfy").deployments[0].workflow == str(tmp_path / "w.json")
    with pytest.raises(RegistryError) as caught:
        _load(
            tmp_path,
            deployments=[{**deployments[0], "id": "box-b", "workflow": "workflows/basic.json"}],
        )
    assert "model 'comfy': deployment 'box-b': workflow:" in str(caught.value)
    assert "UI format" in str(caught.value)


def test_an_entry_of_comfyui_deployments_needs_no_server_of_its_own(tmp_path: Path) -> None:
    shutil.copy(WORKFLOW_FILE, tmp_path / "w.json")
    box = {"provider": "comfyui", "workflow": "w.json", "workflow_inputs": INPUTS}
    entry: dict[str, Any] = {
        "name": "farm",
        "capabilities": CAPS,
        "deployments": [
            {"id": "box-a", "base_url": "http://a.test:8188", **box},
            {"id": "box-b", "base_url": "http://b.test:8188", **box},
        ],
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    spec = load_registry(path).get("farm")
    assert spec.provider == "comfyui"
    assert [(d.base_url, d.workflow) for d in spec.upstreams()] == [
        ("http://a.test:8188", str(tmp_path / "w.json")),
        ("http://b.test:8188", str(tmp_path / "w.json")),
    ]
    del entry["deployments"][1]["base_url"]
    path.write_text(yaml.safe_dump({"models": [entry]}))
    with pytest.raises(RegistryError, match="base_url: a comfyui upstream needs one"):
        load_registry(path)


# --- submit and look -----------------------------------------------------------------


def test_a_batch_is_queued_once_with_the_requests_fields_and_looked_at_until_run(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    spec = _spec(fake.base_url)
    call = _call(spec, count=3, size="96x64", seed=1234)
    ref = provider.submit(call)
    (body,) = fake.workflows
    assert len(body["client_id"]) == 36  # a uuid
    graph = body["prompt"]
    assert graph["6"]["inputs"]["text"] == "a red fox"
    assert graph["7"]["inputs"]["text"] == "bad hands"  # not mapped: as the file has it
    assert graph["3"]["inputs"]["seed"] == 1234
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (96, 64)
    assert graph["5"]["inputs"]["batch_size"] == 3
    assert graph["3"]["inputs"]["steps"] == 20  # no request field sets steps
    assert ref["prompts"][0]["seed"] == 1234
    assert isinstance(provider.poll(call, ref), Pending)
    assert isinstance(provider.poll(call, ref), Pending)
    done = provider.poll(call, ref)
    assert isinstance(done, Generation)
    assert [_size(image.data) for image in done.images] == [(96, 64)] * 3
    again = provider.poll(call, ref)  # idempotent: a run prompt answers every time
    assert isinstance(again, Generation)
    assert [i.data for i in again.images] == [i.data for i in done.images]
    assert fake.submits == 1


def test_without_an_n_input_each_image_is_a_prompt_of_its_own_seed(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    fake.inputs = NO_N
    spec = _spec(fake.base_url, workflow_inputs=NO_N)
    call = Call(spec, _call(spec, seed=50).params.model_copy(update={"n": 4}), 2, first_index=2)
    ref = provider.submit(call)
    assert [p["seed"] for p in ref["prompts"]] == [52, 53]
    assert [w["prompt"]["3"]["inputs"]["seed"] for w in fake.workflows] == [52, 53]
    assert {w["prompt"]["5"]["inputs"]["batch_size"] for w in fake.workflows} == {1}
    assert len(_until_done(provider, call, ref).images) == 2


def test_a_random_seed_is_set_and_recorded_where_the_request_has_none(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    spec = _spec(fake.base_url)
    ref = provider.submit(_call(spec))
    seed = fake.workflows[0]["prompt"]["3"]["inputs"]["seed"]
    assert ref["prompts"][0]["seed"] == seed != 8566257


def test_a_workflow_the_server_refuses_is_a_permanent_refusal_naming_the_node(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    fake.checkpoints = ["sdxl.safetensors"]  # the server lacks the workflow's model
    with pytest.raises(PermanentProviderError) as caught:
        provider.submit(_call(_spec(fake.base_url)))
    assert caught.value.code == "upstream_rejected"
    assert "Prompt outputs failed validation" in caught.value.message
    assert "node 4 (CheckpointLoaderSimple): Value not in list: ckpt_name:" in caught.value.message
    assert (fake.submits, len(fake.refused)) == (0, 1)


def test_a_failed_run_is_an_error_with_the_nodes_message(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    fake.pending_polls = 0
    spec = _spec(fake.base_url)
    call = _call(spec, prompt="a fox [execution-error]")
    with pytest.raises(PermanentProviderError) as caught:
        provider.poll(call, provider.submit(call))
    assert caught.value.code == "upstream_error"
    assert caught.value.message == (
        "ComfyUI failed at node 3 (KSampler): RuntimeError: mat1 and mat2 shapes cannot be "
        "multiplied (77x768)"
    )
    call = _call(spec, prompt="a fox [oom]")
    with pytest.raises(TransientProviderError) as oom:
        provider.poll(call, provider.submit(call))
    assert oom.value.code == "out_of_memory"


def test_a_prompt_the_server_no_longer_has_is_lost_not_pending(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    spec = _spec(fake.base_url)
    call = _call(spec)
    ref = provider.submit(call)
    pending = provider.poll(call, ref)
    assert isinstance(pending, Pending)
    assert pending.status == "queued or running (1 in the server's queue)"
    fake.lose()  # restarted: its queue and history were in memory
    with pytest.raises(PromptLost):
        provider.poll(call, ref)


def test_an_unreachable_server_is_pending_while_looking(provider: ComfyUIProvider) -> None:
    spec = _spec("http://127.0.0.1:9")
    answer = provider.poll(_call(spec), {"prompts": [{"prompt_id": "p-1", "images": 1}]})
    assert isinstance(answer, Pending)
    assert answer.status == "not reached (upstream_unavailable)"


def test_a_proxys_503_is_transient_with_its_retry_after(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    call = _call(_spec(fake.base_url), prompt="busy [503-once]")
    with pytest.raises(TransientProviderError) as caught:
        provider.submit(call)
    assert caught.value.retry_after == 1.0
    assert fake.submits == 0
    provider.submit(call)
    assert fake.submits == 1


def test_a_key_is_sent_as_a_bearer_token_to_a_server_behind_a_proxy(
    provider: ComfyUIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeComfyUI(api_key="proxy-secret").start()
    try:
        spec = _spec(fake.base_url, api_key_env="COMFY_PROXY_KEY")
        monkeypatch.setenv("COMFY_PROXY_KEY", "wrong")
        with pytest.raises(PermanentProviderError) as caught:
            provider.submit(_call(spec))
        assert caught.value.code == "upstream_auth_error"
        assert "wrong" not in caught.value.message
        monkeypatch.setenv("COMFY_PROXY_KEY", "proxy-secret")
        fake.pending_polls = 0
        call = _call(spec)
        assert len(_until_done(provider, call, provider.submit(call)).images) == 1
        assert fake.unauthorized == 1
    finally:
        fake.stop()


def test_generate_waits_in_place(fake: FakeComfyUI, provider: ComfyUIProvider) -> None:
    generation = provider.generate(_call(_spec(fake.base_url), count=2))
    assert [_size(image.data) for image in generation.images] == [(64, 64)] * 2
    assert fake.submits == 1


# --- cancel --------------------------------------------------------------------------


def test_cancel_deletes_a_queued_prompt_and_interrupts_only_the_running_one(
    fake: FakeComfyUI, provider: ComfyUIProvider
) -> None:
    fake.pending_polls = 1000
    spec = _spec(fake.base_url)
    first = provider.submit(_call(spec, prompt="first"))
    second = provider.submit(_call(spec, prompt="second"))
    first_id, second_id = first["prompts"][0]["prompt_id"], second["prompts"][0]["prompt_id"]
    provider.cancel(spec, second)  # queued behind the first
    assert (fake.deleted, fake.interrupts) == ([second_id], [])
    provider.cancel(spec, first)  # running
    assert (fake.deleted, fake.interrupts) == ([second_id], [first_id])
    with pytest.raises(TransientProviderError, match="interrupted"):
        provider.poll(_call(spec), first)
    provider.cancel(spec, first)  # done: nothing to ask
    assert (fake.deleted, fake.interrupts) == ([second_id], [first_id])
