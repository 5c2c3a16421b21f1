"""``imagegen dev`` on embedded defaults: SQLite, local files, filesystem broker,
no Redis, PostgreSQL or S3, with a fresh directory and no IMAGEGEN_* settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import openai
import pytest
from PIL import Image

from tests.support.processes import (
    ServiceProcess,
    free_port,
    imagegen_workers,
    wait_for,
    wait_http,
)

KEY = "sk-ig-embedded-test-key"


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = Path(tmp_path_factory.mktemp("embedded"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.pop("OPENAI_API_KEY", None)
    env |= {"IMAGEGEN_PORT": str(port), "IMAGEGEN_DEV_API_KEY": KEY}
    # The dev server runs in the new directory: its data lands under ./.imagegen.
    proc = ServiceProcess(["dev"], env, home / "dev.log", cwd=home).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        yield f"http://127.0.0.1:{port}", home
    finally:
        proc.stop()


def test_openai_package_works_on_embedded_defaults(dev_server: tuple[str, Path]) -> None:
    base, home = dev_server
    with openai.OpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0) as client:
        result = client.images.generate(prompt="embedded otter", size="256x256", n=2)
    assert result.data is not None
    assert len(result.data) == 2
    url = result.data[0].url
    assert url is not None
    assert url.startswith(base)
    resp = httpx.get(url)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    assert (home / ".imagegen" / "imagegen.db").exists()  # SQLite, under the data dir
    assert list((home / ".imagegen" / "files").rglob("*.png"))
    # The embedded broker keeps all its files under the data dir, none in the cwd.
    assert not (home / "control").exists()
    assert list((home / ".imagegen" / "broker" / "control").glob("*.exchange"))


def test_local_file_urls_need_a_valid_unexpired_signature(dev_server: tuple[str, Path]) -> None:
    base, _ = dev_server
    resp = httpx.post(
        f"{base}/v1/images/generations",
        json={"prompt": "signed", "size": "64x64"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    url = resp.json()["data"][0]["url"]
    parsed = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    bare = f"{base}{parsed.path}"
    assert httpx.get(url).status_code == 200
    tampered = {**query, "signature": "0" * 64}
    assert httpx.get(f"{bare}?{urlencode(tampered)}").status_code == 403
    expired = {**query, "expires": "1000"}
    resp = httpx.get(f"{bare}?{urlencode(expired)}")
    assert resp.status_code == 403
    assert resp.json()["error"]["message"]
    assert httpx.get(bare).status_code == 400  # no signature at all
    other = bare.replace("/0.png", "/1.png")
    assert httpx.get(f"{other}?{parsed.query}").status_code == 403


def test_cli_generate_saves_images(dev_server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = dev_server
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "generate",
            "a cli heron",
            "--size",
            "64x64",
            "--n",
            "2",
            "--out",
            str(out),
            "--base-url",
            base,
            "--api-key",
            KEY,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    assert all(image_size(f) == (64, 64) for f in files)


def test_cli_batch_submit_wait_and_download(dev_server: tuple[str, Path], tmp_path: Path) -> None:
    """Batches on the embedded defaults (SQLite, filesystem broker, local files)."""
    base, _ = dev_server
    common = ["--base-url", base, "--api-key", KEY]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue owl\n\na green frog\n")
    submitted = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "batch",
            "submit",
            str(prompts),
            "--model",
            "procedural",
            "--size",
            "64x64",
            "--wait",
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert batch_id.startswith("batch_")
    assert "completed" in submitted.stderr
    out = tmp_path / "out"
    downloaded = subprocess.run(
        [sys.executable, "-m", "cli", "batch", "download", batch_id, "--out", str(out), *common],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert downloaded.returncode == 0, downloaded.stderr
    names = sorted(p.name for p in out.glob("*.png"))
    # named after their prompts
    assert names == ["0001-a-red-fox-0.png", "0002-a-blue-owl-0.png", "0003-a-green-frog-0.png"]
    assert all(image_size(p) == (64, 64) for p in out.glob("*.png"))
    assert (out / f"{batch_id}_output.jsonl").read_text().count("\n") == 3
    manifest = [json.loads(x) for x in (out / f"{batch_id}_images.jsonl").read_text().splitlines()]
    # the output keeps the prompt of each image, and the line it came from
    assert sorted((m["file"], m["prompt"], m["line"]) for m in manifest) == [
        ("0001-a-red-fox-0.png", "a red fox", 1),
        ("0002-a-blue-owl-0.png", "a blue owl", 2),
        ("0003-a-green-frog-0.png", "a green frog", 3),
    ]

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(
                {
                    "custom_id": cid,
                    "method": "POST",
                    "url": "/v1/images/generations",
                    "body": {"prompt": cid, "size": size},
                }
            )
            for cid, size in [("good", "64x64"), ("bad", "7x7")]
        )
        + "\n"
    )
    submitted = subprocess.run(
        [sys.executable, "-m", "cli", "batch", "submit", str(jsonl), "--wait", *common],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    status = subprocess.run(
        [sys.executable, "-m", "cli", "batch", "status", submitted.stdout.strip(), *common],
        capture_output=True,
        text=True,
        timeout=60,
    )
    batch = json.loads(status.stdout)
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}


def test_dev_starts_its_worker_again_when_it_dies(dev_server: tuple[str, Path]) -> None:
    base, home = dev_server
    [worker] = imagegen_workers(cwd=home)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: imagegen_workers(cwd=home) not in ([], [worker]), 30, "a new worker")
    with openai.OpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0, timeout=60) as client:
        result = client.images.generate(prompt="after the crash", size="256x256")
    assert result.data is not None
    assert result.data[0].url


def test_dev_killed_outright_leaves_no_worker_behind(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = Path(tmp_path_factory.mktemp("embedded-kill"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env |= {"IMAGEGEN_PORT": str(port), "IMAGEGEN_DEV_API_KEY": KEY}
    proc = ServiceProcess(["dev"], env, home / "dev.log", cwd=home).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        wait_for(lambda: len(imagegen_workers(cwd=home)) == 1, 30, "the dev worker")
        proc.kill()  # SIGKILL: no chance to stop its worker itself
        wait_for(lambda: not imagegen_workers(cwd=home), 30, "the orphaned worker to exit")
    finally:
        proc.stop()


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def imagegen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80"},
    )


def test_cli_jobs_list_get_watch_cancel(dev_server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = dev_server
    common = ["--base-url", base, "--api-key", KEY]
    made = httpx.post(
        f"{base}/v1/images/generations",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": "cli jobs", "size": "64x64"},
        timeout=60,
    )
    assert made.status_code == 200
    listed = imagegen("jobs", "list", "--json", "-l", "5", *common)
    assert listed.returncode == 0, listed.stderr
    newest = json.loads(listed.stdout.splitlines()[0])
    table = imagegen("jobs", "list", *common)
    assert newest["id"] in table.stdout  # whole, even at 80 columns
    got = imagegen("jobs", "get", newest["id"], *common)
    assert json.loads(got.stdout)["id"] == newest["id"]
    watched = imagegen("jobs", "watch", newest["id"], *common)
    assert watched.returncode == 0
    assert "job.succeeded" in watched.stderr
    assert watched.stdout.strip().startswith("http")
    as_lines = imagegen("jobs", "watch", newest["id"], "--json", *common)
    events = [json.loads(line) for line in as_lines.stdout.splitlines()]
    assert [e["event"] for e in events] == ["job.succeeded"]
    assert events[0]["job"]["result"]["data"][0]["url"].startswith("http")
    generated = imagegen(
        "generate", "a json heron", "--size", "64x64", "--out", str(tmp_path), "--json", *common
    )
    assert generated.returncode == 0, generated.stderr
    files = json.loads(generated.stdout)["files"]
    assert [image_size(Path(f)) for f in files] == [(64, 64)]
    finished = imagegen("jobs", "cancel", newest["id"], *common)
    assert finished.returncode == 1
    assert "409" in finished.stderr


def test_cli_an_all_failed_batch_exits_non_zero_with_its_reasons(
    dev_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, _ = dev_server
    common = ["--base-url", base, "--api-key", KEY]
    prompts = tmp_path / "bad.txt"
    prompts.write_text("one\ntwo\n")
    result = imagegen("batch", "submit", str(prompts), "--size", "7x7", "--wait", *common)
    assert result.returncode == 1
    assert "0 done, 2 failed of 2" in result.stderr
    assert "Invalid value '7x7' for 'size'" in result.stderr
    listed = imagegen("batch", "list", "--json", *common)
    assert listed.returncode == 0
    assert json.loads(listed.stdout.splitlines()[0])["request_counts"]["failed"] == 2
