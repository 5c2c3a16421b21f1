"""Replicate and fal models (provider: replicate, fal) through the `openai` package,
in-process, their upstreams the fakes (tests/support/fakes/replicate.py, fal.py):
each call submitted once and looked at until done (several looks pending), n images
whichever way (one prediction for n, or fanned out one request an image), both
response formats from our storage, refusals as our 400 and not retried, a
throttled create retried, a canceled job's upstream job canceled there (and a
job's past its Cancel-After deadline); and edits
and variations (images.edit, images.create_variation) with the input image and the
mask as each provider's document says (data URIs; Replicate's files API above 1
MB), answered as the models made them."""

from __future__ import annotations

import base64
import io
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from PIL import Image

from shared.batches import pump
from shared.core.clock import utcnow
from shared.core.settings import get_settings
from shared.core.storage import LocalStorage
from shared.jobs import service as jobs_service
from shared.providers import replicate as replicate_provider
from shared.providers.fal import FalProvider
from shared.providers.replicate import ReplicateProvider
from shared.registry import get_registry
from tests.service.conftest import Service
from tests.support.fakes.fal import EXPECTED_KEY, FakeFal
from tests.support.fakes.queue_http import PAINT
from tests.support.fakes.replicate import EXPECTED_TOKEN, FakeReplicate
from tests.support.stack import models_yaml
from worker import sweeper, upstream_jobs


def _entries(replicate: str, fal: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "flux-schnell",
            "provider": "replicate",
            "base_url": replicate,
            "api_key_env": "REPLICATE_SERVICE_TOKEN",
            "upstream_model": "black-forest-labs/flux-schnell",
            "poll_seconds": 0.05,
            "capabilities": {"sizes": ["64x64"], "max_n": 4, "upstream_max_n": 4, "seed": True},
        },
        {
            "name": "flux-dev",
            "provider": "fal",
            "base_url": fal,
            "api_key_env": "FAL_SERVICE_KEY",
            "upstream_model": "fal-ai/flux/dev",
            "poll_seconds": 0.05,
            "capabilities": {"sizes": ["64x64"], "max_n": 4, "upstream_max_n": 1},
        },
        {  # file_inputs unset: Kontext's input_image
            "name": "flux-kontext",
            "provider": "replicate",
            "base_url": replicate,
            "api_key_env": "REPLICATE_SERVICE_TOKEN",
            "upstream_model": "black-forest-labs/flux-kontext-pro",
            "poll_seconds": 0.05,
            "capabilities": {"sizes": ["auto", "64x64"], "edits": True},
        },
        {
            "name": "flux-fill",
            "provider": "fal",
            "base_url": fal,
            "api_key_env": "FAL_SERVICE_KEY",
            "upstream_model": "fal-ai/flux-pro/v1/fill",
            "file_inputs": {"image": "image_url", "mask": "mask_url"},
            "poll_seconds": 0.05,
            "capabilities": {"sizes": ["64x64"], "output_formats": ["png"], "edits": True},
        },
        {
            "name": "flux-redux",
            "provider": "fal",
            "base_url": fal,
            "api_key_env": "FAL_SERVICE_KEY",
            "upstream_model": "fal-ai/flux/dev/redux",
            "poll_seconds": 0.05,
            "capabilities": {"sizes": ["64x64"], "variations": True},
        },
    ]


@pytest.fixture(scope="module")
def fakes(
    service: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FakeReplicate, FakeFal]]:
    """Both fakes, the registry with their models besides the usual ones, their
    keys, and retries spaced closely; all undone after."""
    replicate, fal = FakeReplicate().start(), FakeFal().start()
    models = models_yaml("http://127.0.0.1:9/v1")
    models["models"] += _entries(replicate.base_url, fal.base_url)
    path = Path(tmp_path_factory.mktemp("queues")) / "models.yaml"
    path.write_text(yaml.safe_dump(models))
    patch = pytest.MonkeyPatch()
    patch.setenv("IMAGEGEN_MODELS_FILE", str(path))
    patch.setenv("IMAGEGEN_PROVIDER_BACKOFF_SECONDS", "0.05")
    patch.setenv("REPLICATE_SERVICE_TOKEN", EXPECTED_TOKEN)
    patch.setenv("FAL_SERVICE_KEY", EXPECTED_KEY)
    get_registry.cache_clear()
    get_settings.cache_clear()
    yield replicate, fal
    patch.undo()
    get_registry.cache_clear()
    get_settings.cache_clear()
    for provider in (ReplicateProvider, FalProvider):
        provider.shared().client.close()  # the process's client, made on first use
    replicate.stop()
    fal.stop()


@pytest.fixture
def api(service: Service, fakes: tuple[FakeReplicate, FakeFal]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=service.key_a,
        base_url="http://service.test/v1",
        http_client=service.client(),
        max_retries=0,
    ) as client:
        yield client


def _size(b64: str | None) -> tuple[int, int]:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_replicate_makes_n_images_in_one_prediction_looked_at_until_done(
    api: openai.OpenAI, fakes: tuple[FakeReplicate, FakeFal]
) -> None:
    replicate, _ = fakes
    result = api.images.generate(
        model="flux-schnell",
        prompt="a lynx on a ridge",
        n=3,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 1234},
    )
    assert result.data is not None
    assert [_size(item.b64_json) for item in result.data] == [(64, 64)] * 3
    (made,) = replicate.creates_for("a lynx on a ridge")
    assert made["model"] == "black-forest-labs/flux-schnell"
    model_input = made["body"]["input"]
    assert (model_input["num_outputs"], model_input["seed"]) == (3, 1234)
    assert replicate.looks[made["id"]] >= replicate.polls  # pending, then done


def test_fal_fans_out_and_url_answers_are_our_own_urls(
    api: openai.OpenAI, service: Service, fakes: tuple[FakeReplicate, FakeFal]
) -> None:
    _, fal = fakes
    result = api.images.generate(
        model="flux-dev", prompt="a heron in reeds", n=2, size="64x64", response_format="url"
    )
    assert result.data is not None
    assert len(result.data) == 2
    for item in result.data:
        assert item.url
        assert item.url.startswith("http://service.test/v1/images/files/")
        got = service.client().get(item.url)
        assert got.status_code == 200
        assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    submitted = fal.submitted_for("a heron in reeds")
    assert [s["body"]["num_images"] for s in submitted] == [1, 1]  # one image a request


@pytest.mark.parametrize(
    ("model", "prompt"),
    [("flux-schnell", "a riot [nsfw]"), ("flux-dev", "a riot [policy]"), ("flux-dev", "[nsfw] 2")],
)
def test_refusals_answer_our_400_and_are_not_retried(
    api: openai.OpenAI, fakes: tuple[FakeReplicate, FakeFal], model: str, prompt: str
) -> None:
    replicate, fal = fakes
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(model=model, prompt=prompt, size="64x64")
    assert caught.value.code == "content_policy_violation"
    submitted = replicate.creates_for(prompt) + fal.submitted_for(prompt)
    assert len(submitted) == 1


def test_a_throttled_create_is_retried(
    api: openai.OpenAI, fakes: tuple[FakeReplicate, FakeFal]
) -> None:
    replicate, _ = fakes
    prompt = "[429-once] a gull"
    result = api.images.generate(
        model="flux-schnell", prompt=prompt, size="64x64", response_format="b64_json"
    )
    assert result.data is not None
    assert len(result.data) == 1
    assert replicate.counts[prompt] == 2  # refused once, then created
    assert len(replicate.creates_for(prompt)) == 1


@pytest.mark.parametrize("model", ["flux-schnell", "flux-dev"])
def test_a_canceled_job_cancels_its_upstream_job_submitted_once(
    service: Service, fakes: tuple[FakeReplicate, FakeFal], model: str
) -> None:
    replicate, fal = fakes
    prompt = f"[hold] a long one on {model}"
    client = service.client()
    job = client.post(
        "/v1/images/generations",
        headers={"Prefer": "respond-async"},
        json={"model": model, "prompt": prompt, "size": "64x64"},
    ).json()
    deadline = time.monotonic() + 10
    looked = replicate.looks if model == "flux-schnell" else fal.looks
    while not any(looked[ref] >= 3 for ref in _upstream_ids(replicate, fal, prompt)):
        assert time.monotonic() < deadline, "the upstream job was never looked at"
        time.sleep(0.02)
    assert client.post(f"/v1/images/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    assert upstream_jobs.cancel(job["id"]) == 1  # the cancel_upstream task's body
    (upstream_id,) = _upstream_ids(replicate, fal, prompt)  # never submitted twice
    assert upstream_id in replicate.canceled + fal.canceled


def test_a_deadline_cancels_the_upstream_job_and_charges_nothing(
    service: Service, fakes: tuple[FakeReplicate, FakeFal], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel-After (issue 29) on a prediction that never ends: past the deadline the
    sweeper ends the job (deadline_exceeded) and its prediction is canceled there."""
    replicate, fal = fakes
    prompt = "[hold] a deadline on flux-schnell"
    client = service.client()
    job = client.post(
        "/v1/images/generations",
        headers={"Prefer": "respond-async", "Cancel-After": "30s"},
        json={"model": "flux-schnell", "prompt": prompt, "size": "64x64"},
    ).json()
    deadline = time.monotonic() + 10
    while not any(replicate.looks[ref] >= 2 for ref in _upstream_ids(replicate, fal, prompt)):
        assert time.monotonic() < deadline, "the upstream job was never looked at"
        time.sleep(0.02)
    later = utcnow() + timedelta(seconds=31)
    monkeypatch.setattr(jobs_service, "utcnow", lambda: later)
    assert sweeper.end_overdue_jobs() == 1
    ended = client.get(f"/v1/images/jobs/{job['id']}").json()
    assert (ended["status"], ended["error"]["code"]) == ("canceled", "deadline_exceeded")
    assert "cost_usd" not in ended
    assert upstream_jobs.cancel(job["id"]) == 1  # the cancel_upstream task's body
    (upstream_id,) = _upstream_ids(replicate, fal, prompt)
    assert upstream_id in replicate.canceled


def _upstream_ids(replicate: FakeReplicate, fal: FakeFal, prompt: str) -> list[str]:
    made = [c["id"] for c in replicate.creates_for(prompt)]
    with fal.served.lock:
        queued = [rid for rid, r in fal.requests.items() if prompt in r["body"]["prompt"]]
    return made + queued


def test_a_canceled_batch_cancels_its_lines_upstream_jobs(
    service: Service, fakes: tuple[FakeReplicate, FakeFal], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines waiting on their predictions when the batch is canceled: each gets a
    cancel_upstream task (published after the commit), whose body cancels the
    prediction there."""
    replicate, _ = fakes
    published: list[str] = []
    monkeypatch.setattr(
        pump, "publish_upstream_cancel", lambda job_id, queue: published.append(job_id)
    )
    prompts = [f"[hold] batch line {i}" for i in range(2)]
    client = service.client()
    batch = client.post(
        "/v1/images/batches",
        json={"model": "flux-schnell", "size": "64x64", "prompts": prompts},
    ).json()
    deadline = time.monotonic() + 10
    while not all(
        replicate.creates_for(p) and replicate.looks[replicate.creates_for(p)[0]["id"]] >= 2
        for p in prompts
    ):
        assert time.monotonic() < deadline, "the lines' predictions were never looked at"
        time.sleep(0.02)
    assert client.post(f"/v1/images/batches/{batch['id']}/cancel").status_code == 200
    deadline = time.monotonic() + 10
    while len(published) < 2:
        assert time.monotonic() < deadline, published
        time.sleep(0.02)
    for job_id in published:
        assert upstream_jobs.cancel(job_id) == 1
    assert {c["id"] for p in prompts for c in replicate.creates_for(p)} <= set(replicate.canceled)


RED = (200, 20, 20)


def _png(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _picture(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


@pytest.mark.parametrize("uploaded", [False, True])
def test_an_edit_through_replicate_sends_the_image_once_and_answers_the_models_edit(
    api: openai.OpenAI,
    fakes: tuple[FakeReplicate, FakeFal],
    monkeypatch: pytest.MonkeyPatch,
    uploaded: bool,
) -> None:
    """A file under Replicate's data URI limit goes inline; over it, uploaded with the
    files API and its URL passed (the limit lowered here: the test's image is small)."""
    replicate, _ = fakes
    if uploaded:
        monkeypatch.setattr(replicate_provider, "MAX_DATA_URI_BYTES", 10)
    prompt = f"a red card, uploaded: {uploaded}"
    result = api.images.edit(
        model="flux-kontext",
        image=("in.png", _png((48, 32), RED), "image/png"),
        prompt=prompt,
        response_format="b64_json",
    )
    assert result.data is not None
    picture = _picture(result.data[0].b64_json)
    # The model's edit of our image (the fake answers the input it read), its size
    # the input's own (size auto: no ratio sent).
    assert (picture.size, picture.getpixel((10, 10))) == ((48, 32), RED)
    (made,) = replicate.creates_for(prompt)  # submitted once, then looked at
    sent = made["body"]["input"]["input_image"]
    assert sent.startswith(f"{replicate.base_url}/files/" if uploaded else "data:image/png;")


def test_a_waiting_edit_reads_its_uploads_from_storage_once_not_at_every_look(
    api: openai.OpenAI, fakes: tuple[FakeReplicate, FakeFal], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's input image is read back for the submit; the looks that follow
    (each a new attempt of the queued job) never read it again."""
    replicate, _ = fakes
    reads: list[str] = []
    real_get = LocalStorage.get

    def counted(self: LocalStorage, key: str) -> bytes:
        reads.append(key)
        return real_get(self, key)

    monkeypatch.setattr(LocalStorage, "get", counted)
    prompt = "a red card, read once"
    api.images.edit(
        model="flux-kontext",
        image=("in.png", _png((48, 32), RED), "image/png"),
        prompt=prompt,
        response_format="b64_json",
    )
    (made,) = replicate.creates_for(prompt)
    assert replicate.looks[made["id"]] >= replicate.polls >= 2  # several looks
    assert len([key for key in reads if "/input-" in key]) == 1


def test_an_edit_with_a_mask_through_fal_paints_only_where_the_mask_is_transparent(
    api: openai.OpenAI, fakes: tuple[FakeReplicate, FakeFal]
) -> None:
    _, fal = fakes
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # the left half is to be edited
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    result = api.images.edit(
        model="flux-fill",
        image=("in.png", _png((64, 64), RED), "image/png"),
        mask=("mask.png", buf.getvalue(), "image/png"),
        prompt="a blue left half",
        size="64x64",
        response_format="b64_json",
    )
    assert result.data is not None
    picture = _picture(result.data[0].b64_json)
    assert picture.getpixel((4, 32)) == PAINT  # filled by the model
    assert picture.getpixel((60, 32)) == RED  # kept
    (submitted,) = fal.submitted_for("a blue left half")
    assert submitted["body"]["mask_url"].startswith("data:image/png;base64,")


def test_a_variation_through_fal_sends_the_image_without_a_prompt(
    api: openai.OpenAI, fakes: tuple[FakeReplicate, FakeFal]
) -> None:
    _, fal = fakes
    before = fal.submits
    with warnings.catch_warnings():
        # The openai package marks create_variation deprecated (dall-e-2's), not gone.
        warnings.simplefilter("ignore", DeprecationWarning)
        result = api.images.create_variation(
            model="flux-redux",
            image=("in.png", _png((64, 64), RED), "image/png"),
            size="64x64",  # type: ignore[arg-type]
            response_format="b64_json",
        )
    assert result.data is not None
    assert _picture(result.data[0].b64_json).getpixel((10, 10)) == RED
    assert fal.submits == before + 1
    body = fal.submitted[-1]["body"]
    assert "prompt" not in body
    assert body["image_url"].startswith("data:image/png;base64,")


def test_an_edit_to_a_queue_model_without_edits_is_refused_at_our_edge(
    api: openai.OpenAI, fakes: tuple[FakeReplicate, FakeFal]
) -> None:
    replicate, _ = fakes
    before = replicate.submits
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.edit(
            model="flux-schnell",
            image=("in.png", _png((64, 64), RED), "image/png"),
            prompt="never sent",
        )
    assert "does not make edits" in str(caught.value)
    assert replicate.submits == before
