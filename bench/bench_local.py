"""Local models, run by hand (issues 12 and 30):

    python -m bench.bench_local direct [--arch sd15 sdxl] [--dtype bfloat16 float16]
    python -m bench.bench_local queue  [--arch sd15] [--requests 8]
    python -m bench.bench_local load   [--arch sd15 sdxl] [--clients 16] [--seconds 60]
                                       [--batch-images 4] [--json results.json]

Full-size architectures built from their published configs with random weights:
the same layers, so the same compute and memory, as the trained models, with
nothing downloaded (the images are noise). SD 1.5 at 512x512 and SDXL at
1024x1024, 25 steps, the tokenizer a byte-level stand-in (77 tokens either way);
these need a CUDA GPU. ``--arch tiny`` (the default without one) is a CPU-sized
Stable Diffusion built the same way (tests/support/tiny_diffusion.py's approach,
wider): UNet channels (32, 64, 64), a 4-level VAE (latents 1/8 of the image),
128x128 images, 6 steps, 5.7 M parameters in all. On one core of this 2-core
machine, quiet, one image takes about 0.26 s a call and about 0.2 s an image in
calls of 2 to 8 (0.29 and 0.15 CPU seconds an image at batch 1 and 4 when it is
busy), so the pipeline's compute, not the service's overhead, dominates each
image, and a batched call is worth making, as on a GPU.

``direct``: the pipeline called in this process, as our provider calls it
(``num_images_per_prompt``, CPU generators, PIL output): seconds per call and per
image, images per second, peak GPU memory, for n=1 and n=4 in one call and each
dtype. ``queue``: the same model saved with ``save_pretrained``, served by a real
``imagegen api`` and ``imagegen worker --queues gpu`` (Redis broker and events,
SQLite, local storage), timed per sync request (``response_format=url``) against
the bare pipeline call in this process, alternated request by request (the
median of the paired differences): what our queue adds (request, broker, claim,
PNG encode, storage, record, wake-up).

``load`` (issue 30, batching across requests), for each ``--arch``, in one run:

1. The physical limit: the bare pipeline called in this process at batch sizes
   1, 2, 4, 8 (as many as fit the GPU's memory), ``n`` prompts and one CPU
   generator per image, as a batched call of the provider makes them (the median
   of ``--runs`` calls after a warm-up); its best images/s and that batch size.
2. The same model saved and served by a real ``imagegen api`` and ``imagegen
   worker --queues gpu`` (Redis on 127.0.0.1, SQLite, local storage), twice, each
   with a fresh API and worker: batching off (``max_batch_images: 1`` in the
   models file) and on (``max_batch_images: --batch-images``, ``batch_wait_ms``
   the registry's default unless ``--batch-wait-ms``). Each run: a warm-up (one
   request, which waits for the model to load, then one request per client at
   once); the idle latency (``--idle-requests`` sync requests, one at a time: the
   p50 a lone user sees); then ``--clients`` clients, each sending its next
   single-image sync request (n=1, ``response_format=url``: the service's answer
   when a request names none, so what a user of the OpenAI SDK gets by default;
   ``--response-format b64_json`` for the bytes inline) as soon as its last one answered, for
   ``--seconds`` (or until ``--requests`` were sent).
   Throughput counts whole pipeline calls: completions that land together (less
   than half a batch-1 call apart) are one call's images, and the window runs
   from the end of the first call to the end of the last call completed before
   the clients stopped sending, so a call cut by either edge is never half
   counted. images/s = the images of the window's calls / its wall time; p50 and
   p95 are of those requests' latencies (sent to answered).
3. The bare pipeline at its best batch size once more, after both runs: the
   limit is the faster of the two (on a shared machine, the stricter ratio).
4. A table, the ratios (images/s on and off against the bare best; idle p50 on
   against off), and with ``--json PATH`` all of it as JSON. Beside the wall
   times, CPU seconds an image: the bare pipeline's (all its threads, by
   ``time.process_time``) and the worker's consumer's over its run (from
   /proc), with their ratio. On a CPU shared with other work the wall-clock
   ratio moves with whatever else runs (the load average after each phase is
   printed); the CPU ratio says what a quiet machine would give where compute
   binds. On a GPU the wall-clock ratio is the figure.

Threads: the bare pipeline and the worker use the same number of torch threads,
``--threads`` (``torch.set_num_threads`` here, ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` in the services' environment). On the CPU it defaults to 1:
on a 2-core machine the other core is left to the API, Redis and the clients, so
the bare pipeline and the worker both get one core for the compute. On a GPU it
defaults to what torch picks here. ``--batch-images`` defaults to 4 on both: the
registry's default, and on the CPU the tiny model's least CPU time an image.

On the CPU (about 3 minutes; the figures are in docs/benchmarks.md)::

    .venv/bin/python -m bench.bench_local load --seconds 30 --json /tmp/load.json

Where a GPU is (one invocation per architecture keeps a failure cheap)::

    .venv/bin/python -m bench.bench_local load --arch sd15 --seconds 120 --json sd15.json
    .venv/bin/python -m bench.bench_local load --arch sdxl --seconds 240 --json sdxl.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from tests.support.processes import ServiceProcess, free_port, imagegen_workers, wait_http
from tests.support.tiny_diffusion import byte_tokenizer, sd_pipeline, sd_scheduler

SIZES = {"sd15": 512, "sdxl": 1024, "tiny": 128}
STEPS = {"sd15": 25, "sdxl": 25, "tiny": 6}
GUIDANCE = 7.5  # a registry entry's default guidance_scale
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
BARE_BATCHES = (1, 2, 4, 8)


def _clip(hidden: int, layers: int, heads: int, projection: bool, act: str) -> Any:
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        vocab_size=49408,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(sample_size: int, scaling: float) -> Any:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling,
    )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_tiny(workdir: Path) -> Any:
    """A CPU-sized Stable Diffusion: the tests' tiny pipeline widened until the
    UNet's compute dominates a call (about 0.26 s an image on one core), with a
    4-level VAE as SD has (latents 1/8 of the image: 16x16 for 128x128)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZES["tiny"] // 8,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZES["tiny"],
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=600,  # the byte tokenizer's 514 symbols
            projection_dim=64,
            max_position_embeddings=77,
        )
    )
    return sd_pipeline(unet, vae, text_encoder, byte_tokenizer(workdir / "tokenizer-src"))


def build(arch: str, dtype: torch.dtype, workdir: Path) -> Any:
    """The pipeline on its device: SD 1.5 and SDXL built on the GPU (random init of
    2.6 B parameters on a CPU takes minutes), the tiny one on the CPU, then moved
    to the GPU if there is one."""
    if arch == "tiny":
        pipe = build_tiny(workdir)
        pipe.to(_device(), dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    tokenizer = byte_tokenizer(workdir / "tokenizer-src")
    torch.manual_seed(0)
    with torch.device("cuda"):
        if arch == "sd15":
            unet = UNet2DConditionModel(
                sample_size=64,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768,
                attention_head_dim=8,
            )
            pipe = sd_pipeline(
                unet, _vae(512, 0.18215), _clip(768, 12, 12, False, "quick_gelu"), tokenizer
            )
        else:
            unet = UNet2DConditionModel(
                sample_size=128,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            pipe = StableDiffusionXLPipeline(
                vae=_vae(1024, 0.13025),
                text_encoder=_clip(768, 12, 12, False, "quick_gelu"),
                text_encoder_2=_clip(1280, 32, 20, True, "gelu"),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=sd_scheduler(),
            )
    pipe.to("cuda", dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe: Any, arch: str, n: int, seed: int = 0, *, prompts: bool = False) -> list[Any]:
    """One pipeline call of ``n`` images, a CPU generator each (seeds seed..seed+n-1).
    One prompt and ``num_images_per_prompt=n`` (one request's n), or with
    ``prompts`` ``n`` prompts of one image each (n requests batched together)."""
    size = SIZES[arch]
    text: str | list[str] = [f"{PROMPT} #{seed + i}" for i in range(n)] if prompts else PROMPT
    out = pipe(
        prompt=text,
        width=size,
        height=size,
        num_inference_steps=STEPS[arch],
        guidance_scale=GUIDANCE,
        num_images_per_prompt=1 if prompts else n,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
        output_type="pil",
    )
    _sync()
    return list(out.images)


def timed(pipe: Any, arch: str, n: int, runs: int, *, prompts: bool = False) -> dict[str, float]:
    call(pipe, arch, n, prompts=prompts)  # warm-up: kernels chosen, allocator grown
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    cpu = time.process_time()
    for run in range(runs):
        start = time.perf_counter()
        call(pipe, arch, n, seed=run * n, prompts=prompts)
        seconds.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    per_call = statistics.median(seconds)
    row = {
        "s_per_call": round(per_call, 3),
        "s_per_image": round(per_call / n, 3),
        "images_per_s": round(n / per_call, 3),
        # CPU seconds of all threads: on a shared CPU, what the wall time hides.
        "cpu_s_per_image": round(cpu / (runs * n), 4),
    }
    if torch.cuda.is_available():
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def direct(args: argparse.Namespace) -> None:
    for arch in args.arch:
        for name in args.dtype:
            with tempfile.TemporaryDirectory() as tmp:
                pipe = build(arch, getattr(torch, name), Path(tmp))
                for n in (1, 4):
                    row: dict[str, Any] = {"arch": arch, "size": SIZES[arch], "dtype": name, "n": n}
                    row.update(timed(pipe, arch, n, args.runs))
                    print(json.dumps(row), flush=True)
                del pipe
                _free()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the services: Redis, SQLite, local storage, `imagegen api`, `imagegen worker`


class Services:
    """A Redis of its own on 127.0.0.1, a SQLite database and local storage in
    ``work``, and an API key; ``serve`` starts an API and a GPU worker on them with
    a models file, and stops both (and the worker's consumers) when it ends."""

    def __init__(self, work: Path, redis_server: str, threads: int) -> None:
        self.work = work
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            [
                *(redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(work)),
            ],
            stdout=subprocess.DEVNULL,
        )
        self.env = {
            **os.environ,
            "IMAGEGEN_DATA_DIR": str(work / "data"),
            "IMAGEGEN_MODELS_FILE": str(work / "models.yaml"),
            "IMAGEGEN_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "IMAGEGEN_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/1",
            "IMAGEGEN_HOST": "127.0.0.1",
            "IMAGEGEN_LOG_LEVEL": "WARNING",
            # The load is the point: no per-key rate limit or daily quota may answer 429.
            "IMAGEGEN_KEY_REQUESTS_PER_MINUTE": "1000000",
            "IMAGEGEN_PROJECT_IMAGES_PER_DAY": "100000000",
            # Stopped after the load drained; if a job is still held (an error,
            # Ctrl-C), the supervisor gives up on it well within ServiceProcess's 15 s.
            "IMAGEGEN_WORKER_DRAIN_SECONDS": "5",
            # The worker's torch threads, as torch.set_num_threads in this process.
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        self.key = ""
        self.logs: list[Path] = []

    def start(self, models: dict[str, Any]) -> None:
        (self.work / "models.yaml").write_text(yaml.safe_dump(models))
        cli = [sys.executable, "-m", "cli"]
        _wait_redis(self.redis_port, self.redis)
        subprocess.run([*cli, "migrate"], env=self.env, check=True, capture_output=True)
        self.key = subprocess.run(
            [*cli, "keys", "create", "--project", "bench"],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]

    @contextmanager
    def serve(self, models: dict[str, Any], tag: str) -> Iterator[Server]:
        """An API and a fresh ``imagegen worker --queues gpu`` on ``models``."""
        (self.work / "models.yaml").write_text(yaml.safe_dump(models))
        port = free_port()
        env = {**self.env, "IMAGEGEN_PORT": str(port)}
        api_log, worker_log = self.work / f"api-{tag}.log", self.work / f"worker-{tag}.log"
        self.logs += [api_log, worker_log]
        api = ServiceProcess(["api"], env, api_log)
        worker = ServiceProcess(["worker", "--queues", "gpu"], env, worker_log)
        try:
            api.start()
            worker.start()
            wait_http(f"http://127.0.0.1:{port}/healthz", 60)
            yield Server(f"http://127.0.0.1:{port}", self.key, worker)
        finally:
            _stop_worker(worker)
            api.stop()

    def close(self) -> None:
        self.redis.terminate()
        try:
            self.redis.wait(10)
        except subprocess.TimeoutExpired:
            self.redis.kill()
            self.redis.wait(5)

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for path in self.logs:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)


@dataclass
class Server:
    base_url: str
    key: str
    worker: ServiceProcess

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=600,  # a request waits for the model's load and a full queue
        )


def _wait_redis(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("redis-server did not answer")


def _stop_worker(worker: ServiceProcess) -> None:
    """Stop the supervisor, then any consumer it left (it is SIGKILLed when it does
    not stop in time, and a consumer would outlive it): by pid, ours only."""
    consumers = imagegen_workers(parent=worker.proc.pid) if worker.proc is not None else []
    worker.stop()
    for pid in consumers:
        with suppress(ProcessLookupError):  # gone with its supervisor, as it should
            os.kill(pid, signal.SIGKILL)


def _models(arch: str, model: Path, dtype: str, max_batch: int, wait_ms: int | None) -> Any:
    size = SIZES[arch]
    entry: dict[str, Any] = {
        "name": arch,
        "provider": "diffusers",
        "model_path": str(model),
        "dtype": dtype,
        "steps": STEPS[arch],
        "guidance_scale": GUIDANCE,
        "max_batch_images": max_batch,
        "capabilities": {"sizes": [f"{size}x{size}"], "max_n": 4},
    }
    if wait_ms is not None:
        entry["batch_wait_ms"] = wait_ms
    return {"models": [entry]}


def queue(args: argparse.Namespace) -> None:
    arch, size = args.arch[0], SIZES[args.arch[0]]
    dtype = args.dtype[0]
    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    services = Services(work, args.redis_server, args.threads)
    try:
        pipe = build(arch, getattr(torch, dtype), work)
        call(pipe, arch, 1)  # warm-up
        pipe.save_pretrained(work / "model")
        models = _models(arch, work / "model", dtype, 1, None)
        services.start(models)
        with services.serve(models, "queue") as server, server.client() as client:
            seconds, bare = [], []
            profiler = None
            for i in range(args.requests + 1):  # the first loads the model: not timed
                if i == 1 and args.py_spy:
                    assert server.worker.proc is not None
                    consumer = imagegen_workers(parent=server.worker.proc.pid)[0]
                    profiler = subprocess.Popen(
                        [
                            *(args.py_spy, "record", "--pid", str(consumer), "--format", "raw"),
                            *("--rate", "200", "--threads", "-o", str(args.profile_out)),
                        ]
                    )
                    time.sleep(1)
                start = time.perf_counter()
                resp = client.post(
                    "/v1/images/generations",
                    json={"model": arch, "prompt": PROMPT, "size": f"{size}x{size}", "seed": i},
                )
                assert resp.status_code == 200, resp.text
                if i:
                    seconds.append(time.perf_counter() - start)
                    # The bare call right after, in the same conditions (the
                    # services idle beside it): paired, so drift cancels out.
                    start = time.perf_counter()
                    call(pipe, arch, 1, seed=i)
                    bare.append(time.perf_counter() - start)
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes what it has
                profiler.wait(30)
        through = statistics.median(seconds)
        alone = statistics.median(bare)
        adds = statistics.median(q - b for q, b in zip(seconds, bare, strict=True))
        print(
            json.dumps(
                {
                    "arch": arch,
                    "dtype": dtype,
                    "size": size,
                    "bare_pipeline_s": round(alone, 3),
                    "through_queue_s": round(through, 3),
                    "queue_adds_ms": round(adds * 1000, 1),
                    "queue_adds_pct": round(adds / alone * 100, 1),
                }
            ),
            flush=True,
        )
    finally:
        services.close()
        shutil.rmtree(work, ignore_errors=True)


# --- load: many clients through the whole stack, against the bare pipeline


@dataclass
class Sample:
    sent: float
    done: float
    ok: bool


@dataclass
class LoadRun:
    samples: list[Sample] = field(default_factory=list)
    stopped_at: float = 0.0
    errors: list[str] = field(default_factory=list)
    worker_cpu_s: float = 0.0


def worker_cpu_seconds(server: Server) -> float:
    """User and system CPU seconds of the worker's consumer processes so far."""
    assert server.worker.proc is not None
    total = 0.0
    for pid in imagegen_workers(parent=server.worker.proc.pid):
        with suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _body(arch: str, i: int, response_format: str) -> dict[str, Any]:
    size = SIZES[arch]
    return {
        "model": arch,
        "prompt": f"{PROMPT} #{i}",
        "size": f"{size}x{size}",
        "n": 1,
        "seed": i,
        "response_format": response_format,
    }


def _post(client: httpx.Client, body: dict[str, Any]) -> str | None:
    """One sync request; None when it answered one image, else what went wrong."""
    resp = client.post("/v1/images/generations", json=body)
    if resp.status_code != 200:
        return f"{resp.status_code}: {resp.text[:300]}"
    data = resp.json().get("data") or []
    return None if len(data) == 1 else f"200 with {len(data)} images"


def closed_loop(
    server: Server,
    arch: str,
    clients: int,
    seconds: float,
    requests: int | None,
    response_format: str,
    first: int,
) -> LoadRun:
    """``clients`` threads, each sending its next request when its last answered,
    until ``seconds`` passed or ``requests`` were sent; then the ones in flight
    are waited for (the next run starts on an empty queue)."""
    run = LoadRun()
    stop = threading.Event()
    numbers = itertools.count(first)  # next() is atomic under the GIL

    def client_loop() -> None:
        with server.client() as client:
            while not stop.is_set():
                i = next(numbers)
                if requests is not None and i - first >= requests:
                    if not stop.is_set():
                        run.stopped_at = time.perf_counter()
                        stop.set()
                    return
                sent = time.perf_counter()
                try:
                    error = _post(client, _body(arch, i, response_format))
                except httpx.HTTPError as exc:  # the API is gone: no point going on
                    run.errors.append(f"{type(exc).__name__}: {exc}")
                    stop.set()
                    return
                run.samples.append(Sample(sent, time.perf_counter(), error is None))
                if error is not None:
                    run.errors.append(error)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    cpu = worker_cpu_seconds(server)
    for thread in threads:
        thread.start()
    if requests is None:
        stop.wait(seconds)
        run.stopped_at = time.perf_counter()
        stop.set()
    for thread in threads:
        thread.join()
    if not run.stopped_at:  # every client ended on an error
        run.stopped_at = time.perf_counter()
    run.worker_cpu_s = worker_cpu_seconds(server) - cpu
    return run


def steady(samples: list[Sample], stopped_at: float, gap: float) -> dict[str, Any]:
    """Throughput over whole pipeline calls. Completions closer than ``gap`` (half a
    batch-1 call) are one call's images; the window runs from the end of the first
    call to the end of the last call that ended before the clients stopped."""
    done = sorted((s for s in samples if s.ok), key=lambda s: s.done)
    calls: list[list[Sample]] = []
    for sample in done:
        if calls and sample.done - calls[-1][-1].done < gap:
            calls[-1].append(sample)
        else:
            calls.append([sample])
    while calls and calls[-1][-1].done > stopped_at:
        calls.pop()  # ended after the clients stopped: fewer companions than steady
    if len(calls) < 3:
        raise RuntimeError(
            f"only {len(calls)} pipeline calls completed in the window: run longer "
            "(--seconds or --requests)"
        )
    window = [s for c in calls[1:] for s in c]
    wall = calls[-1][-1].done - calls[0][-1].done
    latencies = sorted(s.done - s.sent for s in window)
    return {
        "images": len(window),
        "calls": len(calls) - 1,
        "window_s": round(wall, 2),
        "images_per_s": round(len(window) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(statistics.quantiles(latencies, n=20, method="inclusive")[18], 3),
    }


def idle_latency(server: Server, arch: str, requests: int, fmt: str, first: int) -> float:
    """p50 of sync requests sent one at a time to an idle worker."""
    seconds = []
    with server.client() as client:
        for i in range(requests):
            start = time.perf_counter()
            error = _post(client, _body(arch, first + i, fmt))
            if error is not None:
                raise RuntimeError(f"idle request failed: {error}")
            seconds.append(time.perf_counter() - start)
    return round(statistics.median(seconds), 3)


def warm_up(server: Server, arch: str, clients: int, fmt: str, first: int) -> None:
    """One request (it waits for the model to load), then one per client at once
    (kernels chosen for batched shapes): none of it timed."""
    with server.client() as client:
        error = _post(client, _body(arch, first, fmt))
    if error is not None:
        raise RuntimeError(f"warm-up request failed: {error}")
    errors: list[str] = []

    def one(i: int) -> None:
        with server.client() as c:
            error = _post(c, _body(arch, first + 1 + i, fmt))
        if error is not None:
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"warm-up requests failed: {errors[0]}")


def bare_curve(pipe: Any, arch: str, runs: int) -> list[dict[str, Any]]:
    """The bare pipeline at each batch size that fits: n prompts, a CPU generator
    per image, as a batched call of the provider makes them."""
    rows: list[dict[str, Any]] = []
    for n in BARE_BATCHES:
        try:
            row: dict[str, Any] = {"batch": n, **timed(pipe, arch, n, runs, prompts=True)}
        except torch.cuda.OutOfMemoryError:
            _free()
            print(json.dumps({"arch": arch, "batch": n, "bare": "out of memory"}), flush=True)
            break
        print(json.dumps({"arch": arch, "bare": row}), flush=True)
        rows.append(row)
    return rows


def load_one(args: argparse.Namespace, arch: str) -> dict[str, Any]:
    dtype = args.dtype[0]
    work = Path(tempfile.mkdtemp(prefix="bench-local-load-"))
    services = Services(work, args.redis_server, args.threads)
    result: dict[str, Any] = {
        "arch": arch,
        "size": f"{SIZES[arch]}x{SIZES[arch]}",
        "steps": STEPS[arch],
        "dtype": dtype,
    }
    try:
        pipe = build(arch, getattr(torch, dtype), work)
        bare = bare_curve(pipe, arch, args.runs)
        result["bare"] = bare
        result["load_avg"] = {"bare": _load_avg()}
        best = max(bare, key=lambda row: row["images_per_s"])
        pipe.save_pretrained(work / "model")
        # Off the device while the worker runs: it gets the device's whole memory.
        device = pipe.device
        pipe.to("cpu")
        _free()
        gap = bare[0]["s_per_call"] / 2
        services.start(_models(arch, work / "model", dtype, 1, args.batch_wait_ms))
        for index, (mode, max_batch) in enumerate((("off", 1), ("on", args.batch_images))):
            # Request numbers (prompts, seeds) apart from the other run's.
            first = index * 10**6
            models = _models(arch, work / "model", dtype, max_batch, args.batch_wait_ms)
            with services.serve(models, mode) as server:
                warm_up(server, arch, args.clients, args.response_format, first)
                first += args.clients + 1
                idle = idle_latency(server, arch, args.idle_requests, args.response_format, first)
                first += args.idle_requests
                run = closed_loop(
                    server,
                    arch,
                    args.clients,
                    args.seconds,
                    args.requests,
                    args.response_format,
                    first,
                )
                result["load_avg"][mode] = _load_avg()
            row: dict[str, Any] = {
                "max_batch_images": max_batch,
                "requests": len(run.samples),
                "errors": len(run.errors),
                **steady(run.samples, run.stopped_at, gap),
                "idle_p50_s": idle,
                # Every image of the run (ramp and drain too) was made in it.
                "worker_cpu_s_per_image": round(
                    run.worker_cpu_s / max(1, sum(s.ok for s in run.samples)), 4
                ),
            }
            if run.errors:
                row["first_error"] = run.errors[0]
            print(json.dumps({"arch": arch, mode: row}), flush=True)
            result[mode] = row
        # The best batch size once more, after: on a shared machine the limit is
        # the faster of the two (the stricter ratio).
        pipe.to(device)
        after = timed(pipe, arch, best["batch"], args.runs, prompts=True)
        result["load_avg"]["bare_after"] = _load_avg()
        print(json.dumps({"arch": arch, "bare_after": {"batch": best["batch"], **after}}))
        bare_best = max(best["images_per_s"], after["images_per_s"])
        bare_cpu = min(row["cpu_s_per_image"] for row in [*bare, after])
        result["bare_cpu_s_per_image"] = bare_cpu
        result["bare_best"] = {
            "batch": best["batch"],
            "images_per_s": bare_best,
            "before": best["images_per_s"],
            "after": after["images_per_s"],
        }
        result["ratios"] = {
            "on_vs_bare_best": round(result["on"]["images_per_s"] / bare_best, 3),
            "off_vs_bare_best": round(result["off"]["images_per_s"] / bare_best, 3),
            "idle_p50_on_vs_off": round(
                result["on"]["idle_p50_s"] / result["off"]["idle_p50_s"], 3
            ),
            # CPU seconds an image, bare (its least, any batch size) / the worker's:
            # the share of the bare limit a quiet CPU would give, where compute binds.
            "cpu_bare_vs_on": round(bare_cpu / result["on"]["worker_cpu_s_per_image"], 3),
            "cpu_bare_vs_off": round(bare_cpu / result["off"]["worker_cpu_s_per_image"], 3),
        }
        return result
    except BaseException:
        tails = services.log_tails()
        if tails:
            print(tails, file=sys.stderr)
        raise
    finally:
        services.close()
        shutil.rmtree(work, ignore_errors=True)


def _load_avg() -> float:
    """The machine's 1-minute load average: how shared it was during a phase."""
    return round(os.getloadavg()[0], 2)


def table(result: dict[str, Any], threads: int, clients: int) -> str:
    lines = [
        f"{result['arch']} {result['size']}, {result['steps']} steps, {result['dtype']}, "
        f"{threads} torch thread(s), {clients} clients",
        "bare pipeline: "
        + ", ".join(
            f"batch {r['batch']} {r['images_per_s']:.2f} img/s ({r['s_per_call']:.3f} s/call)"
            for r in result["bare"]
        ),
        "| run | max_batch_images | images/s | p50 s | p95 s | idle p50 s | images | errors "
        "| CPU s/image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    best = result["bare_best"]
    lines.append(
        f"| bare pipeline, batch {best['batch']} (best of before {best['before']:.2f}, "
        f"after {best['after']:.2f}) | - | {best['images_per_s']:.2f} "
        f"| - | - | {result['bare'][0]['s_per_call']:.3f} (batch 1 call) | - | - "
        f"| {result['bare_cpu_s_per_image']:.3f} (least) |"
    )
    for mode in ("off", "on"):
        r = result[mode]
        lines.append(
            f"| batching {mode} | {r['max_batch_images']} | {r['images_per_s']:.2f} "
            f"| {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['idle_p50_s']:.3f} "
            f"| {r['images']} | {r['errors']} | {r['worker_cpu_s_per_image']:.3f} |"
        )
    ratios = result["ratios"]
    lines.append(
        "load average (1 min) after each phase: "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["load_avg"].items())
    )
    lines.append(
        f"images/s on / bare best {ratios['on_vs_bare_best']:.2f}, "
        f"off / bare best {ratios['off_vs_bare_best']:.2f}; "
        f"idle p50 on / off {ratios['idle_p50_on_vs_off']:.2f}; "
        f"CPU s/image bare / on {ratios['cpu_bare_vs_on']:.2f}, "
        f"bare / off {ratios['cpu_bare_vs_off']:.2f}"
    )
    return "\n".join(lines)


def load(args: argparse.Namespace) -> None:
    results = []
    for arch in args.arch:
        results.append(load_one(args, arch))
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "threads": args.threads,
        "clients": args.clients,
        "seconds": args.seconds if args.requests is None else None,
        "requests": args.requests,
        "response_format": args.response_format,
        "batch_wait_ms": args.batch_wait_ms,
        "results": results,
    }
    print()
    for result in results:
        print(table(result, args.threads, args.clients), end="\n\n")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds through the finally blocks: the services are stopped.
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("mode", choices=["direct", "queue", "load"])
    parser.add_argument("--arch", nargs="+", choices=sorted(SIZES), help="sd15 sdxl on a GPU")
    parser.add_argument("--dtype", nargs="+", help="bfloat16 float16 on a GPU, float32 on a CPU")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per configuration")
    parser.add_argument(
        "--requests", type=int, help="requests to send (queue: 8; load: all clients)"
    )
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--py-spy", help="py-spy binary: profile the GPU worker (queue)")
    parser.add_argument("--profile-out", default="worker-profile.txt")
    parser.add_argument("--threads", type=int, help="torch threads here and in the worker")
    load_args = parser.add_argument_group("load")
    load_args.add_argument("--clients", type=int, default=16)
    load_args.add_argument("--seconds", type=float, default=60, help="load time per run")
    load_args.add_argument("--batch-images", type=int, default=4, help="max_batch_images, on")
    load_args.add_argument("--batch-wait-ms", type=int, help="batch_wait_ms (registry default)")
    load_args.add_argument("--idle-requests", type=int, default=8)
    load_args.add_argument("--response-format", choices=["url", "b64_json"], default="url")
    load_args.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.arch is None:
        args.arch = ["sd15", "sdxl"] if cuda else ["tiny"]
    if args.dtype is None:
        args.dtype = (
            (["bfloat16", "float16"] if args.mode == "direct" else ["bfloat16"])
            if cuda
            else ["float32"]
        )
    if not cuda and set(args.arch) - {"tiny"}:
        sys.exit("--arch sd15 and sdxl need a CUDA GPU; --arch tiny runs on the CPU")
    if args.mode == "queue" and args.requests is None:
        args.requests = 8
    # Pinned here and (through the environment) in the worker: the bare pipeline
    # and the worker get the same number of threads.
    args.threads = args.threads or (torch.get_num_threads() if cuda else 1)
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(json.dumps({"device": device, "torch": torch.__version__, "threads": args.threads}))
    {"direct": direct, "queue": queue, "load": load}[args.mode](args)


if __name__ == "__main__":
    main()
