"""Local models on a GPU, run by hand where one is (issue 12):

    python -m bench.bench_local direct [--arch sd15 sdxl] [--dtype bfloat16 float16]
    python -m bench.bench_local queue  [--arch sd15] [--requests 8]

Full-size architectures built from their published configs with random weights:
the same layers, so the same compute and memory, as the trained models, with
nothing downloaded (the images are noise). SD 1.5 at 512x512 and SDXL at
1024x1024, 25 steps, the tokenizer a byte-level stand-in (77 tokens either way).

``direct``: the pipeline called in this process, as our provider calls it
(``num_images_per_prompt``, CPU generators, PIL output): seconds per call and per
image, images per second, peak GPU memory, for n=1 and n=4 in one call and each
dtype. ``queue``: the same model saved with ``save_pretrained``, served by a real
``imagegen api`` and ``imagegen worker --queues gpu`` (Redis broker and events,
SQLite, local storage), timed per sync request (``response_format=url``) against
the bare pipeline call in this process, alternated request by request (the
median of the paired differences): what our queue adds (request, broker, claim,
PNG encode, storage, record, wake-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from tests.support.processes import ServiceProcess, free_port, imagegen_workers, wait_http
from tests.support.tiny_diffusion import byte_tokenizer, sd_scheduler

STEPS = 25
SIZES = {"sd15": 512, "sdxl": 1024}
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


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


def build(arch: str, dtype: torch.dtype, workdir: Path) -> Any:
    """The pipeline on the GPU, built there (random init of 2.6 B parameters on a
    CPU takes minutes)."""
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
            pipe = StableDiffusionPipeline(
                vae=_vae(512, 0.18215),
                text_encoder=_clip(768, 12, 12, False, "quick_gelu"),
                tokenizer=tokenizer,
                unet=unet,
                scheduler=sd_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
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


def call(pipe: Any, size: int, n: int, seed: int = 0) -> list[Any]:
    out = pipe(
        prompt=PROMPT,
        width=size,
        height=size,
        num_inference_steps=STEPS,
        num_images_per_prompt=n,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
        output_type="pil",
    )
    torch.cuda.synchronize()
    return list(out.images)


def timed(pipe: Any, size: int, n: int, runs: int) -> dict[str, float]:
    call(pipe, size, n)  # warm-up: kernels chosen, allocator grown
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for run in range(runs):
        start = time.perf_counter()
        call(pipe, size, n, seed=run)
        seconds.append(time.perf_counter() - start)
    per_call = statistics.median(seconds)
    return {
        "s_per_call": round(per_call, 3),
        "s_per_image": round(per_call / n, 3),
        "images_per_s": round(n / per_call, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def direct(args: argparse.Namespace) -> None:
    for arch in args.arch:
        for name in args.dtype:
            with tempfile.TemporaryDirectory() as tmp:
                pipe = build(arch, getattr(torch, name), Path(tmp))
                for n in (1, 4):
                    row = {"arch": arch, "size": SIZES[arch], "dtype": name, "n": n}
                    row.update(timed(pipe, SIZES[arch], n, args.runs))
                    print(json.dumps(row), flush=True)
                del pipe
                torch.cuda.empty_cache()


def queue(args: argparse.Namespace) -> None:
    arch, size = args.arch[0], SIZES[args.arch[0]]
    dtype = args.dtype[0]
    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    pipe = build(arch, getattr(torch, dtype), work)
    call(pipe, size, 1)  # warm-up
    pipe.save_pretrained(work / "model")
    redis_port, port = free_port(), free_port()
    redis = subprocess.Popen(
        [args.redis_server, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    models = {
        "models": [
            {
                "name": arch,
                "provider": "diffusers",
                "model_path": str(work / "model"),
                "dtype": dtype,
                "steps": STEPS,
                "capabilities": {"sizes": [f"{size}x{size}"], "max_n": 4},
            }
        ]
    }
    (work / "models.yaml").write_text(yaml.safe_dump(models))
    env = {
        **os.environ,
        "IMAGEGEN_DATA_DIR": str(work / "data"),
        "IMAGEGEN_MODELS_FILE": str(work / "models.yaml"),
        "IMAGEGEN_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "IMAGEGEN_REDIS_URL": f"redis://127.0.0.1:{redis_port}/1",
        "IMAGEGEN_PORT": str(port),
        "IMAGEGEN_LOG_LEVEL": "WARNING",
    }
    cli = [sys.executable, "-m", "cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
    key = subprocess.run(
        [*cli, "keys", "create", "--project", "bench"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    api = ServiceProcess(["api"], env, work / "api.log").start()
    worker = ServiceProcess(["worker", "--queues", "gpu"], env, work / "worker.log").start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        seconds, bare = [], []
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=600,
        ) as client:
            profiler = None
            for i in range(args.requests + 1):  # the first loads the model: not timed
                if i == 1 and args.py_spy:
                    assert worker.proc is not None
                    consumer = imagegen_workers(parent=worker.proc.pid)[0]
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
                    call(pipe, size, 1, seed=i)
                    bare.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.send_signal(2)  # SIGINT: py-spy writes what it has
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
        worker.stop()
        api.stop()
        redis.terminate()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["direct", "queue"])
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=sorted(SIZES))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--runs", type=int, default=3, help="timed calls per configuration")
    parser.add_argument("--requests", type=int, default=8, help="timed requests (queue)")
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--py-spy", help="py-spy binary: profile the GPU worker (queue)")
    parser.add_argument("--profile-out", default="worker-profile.txt")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_local needs a CUDA GPU")
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    direct(args) if args.mode == "direct" else queue(args)


if __name__ == "__main__":
    main()
