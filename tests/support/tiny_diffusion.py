"""A tiny Stable Diffusion pipeline, built here from configs with fixed random
weights and saved with ``save_pretrained``, as diffusers' own tests build theirs:
nothing is downloaded. Its images are noise, but made by the real code path (text
encoder, UNet denoising loop, scheduler, VAE decode) in milliseconds a step on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def _byte_symbols() -> list[str]:
    """The 256 printable symbols CLIP's byte-level BPE maps bytes to (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def byte_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges): any prompt tokenizes."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    for symbol in _byte_symbols():
        vocab[symbol + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77
    )


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion's DDIM schedule (its published scheduler config)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any) -> Any:
    """A Stable Diffusion pipeline of these parts, with SD's DDIM schedule and no
    safety checker (random weights draw nothing to check)."""
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=sd_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd(folder: Path) -> Path:
    """Write a tiny pipeline to ``folder/model`` and return that path."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=8,
            intermediate_size=16,
            layer_norm_eps=1e-5,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=600,
            projection_dim=8,
            max_position_embeddings=77,
        )
    )
    pipe = sd_pipeline(unet, vae, text_encoder, byte_tokenizer(folder / "tokenizer-src"))
    path = folder / "model"
    pipe.save_pretrained(path)
    return path


def build_tiny_lora(model_path: Path, folder: Path, seed: int = 1, rank: int = 4) -> Path:
    """Write a tiny LoRA for the pipeline at ``model_path`` to ``folder`` (what
    ``save_lora_weights`` writes: ``pytorch_lora_weights.safetensors``) and return
    ``folder``. Made as diffusers' text-to-image LoRA training script makes its own
    (peft on the UNet's attention projections, saved in diffusers' key format), with
    ``lora_B`` random: peft starts it at zero, which would change nothing."""
    unet = UNet2DConditionModel.from_pretrained(model_path / "unet")
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        save_directory=folder, unet_lora_layers=layers, safe_serialization=True
    )
    return folder
