"""Tiny InstructPix2Pix checkpoints built from configs: the test models, and the seed of itsd-tiny.

Every part is real diffusers/transformers code at a toy size: an 8-channel UNet with cross-attention,
a 4-level AutoencoderKL (so latents are 1/8 of the image, as in SD), a CLIP text encoder and the real
CLIP tokenizer. Weights are random (seeded) unless trained later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from training.clip_vocab import write_clip_tokenizer_files

# The scheduler config SD 1.5 and timbrooks/instruct-pix2pix ship.
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# Model sizes as data. "tiny": the test models (~3 M parameters, latents 1/8 as in SD).
# "itsd-tiny": the demo model (training/recipes/itsd_tiny.py), under 30 MB: a one-level VAE that
# training.autoencoder turns into a pixel autoencoder (latents are the image: restoration keeps its detail),
# a 4-level UNet that is narrow at full resolution and attends only at 1/8 (0.3 s per 256-px call of a
# guided batch on 2 cores) and predicts the clean latents, starting as the identity edit (training.copy_path).
# "sd15": Stable Diffusion 1.5's architecture (860 M UNet, CLIP ViT-L/14 text tower), for benchmarks.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": {
            "sample_size": 32,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
        "vae": {
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (16, 16, 32, 32),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 64,
        },
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    },
    "itsd-tiny": {
        "unet": {
            "sample_size": 96,
            "block_out_channels": (16, 32, 64, 128),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
            "up_block_types": ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 4,  # 4 channels per group at full resolution: training.copy_path needs at least 4
            # the instruction also reaches every ResNet: attention-pooled into the timestep embedding
            "addition_embed_type": "text",
            "addition_embed_type_num_heads": 4,
            "resnet_time_scale_shift": "scale_shift",  # FiLM: the embedding scales each ResNet's features too
        },
        "vae": {
            "down_block_types": ("DownEncoderBlock2D",),
            "up_block_types": ("UpDecoderBlock2D",),
            "block_out_channels": (16,),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "mid_block_add_attention": False,
            "sample_size": 256,
        },
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        # SD's betas rescaled to zero terminal SNR: t = 999 is pure noise in training, as it is at sampling's start
        # (SD's schedule keeps 7% of the target there, and the UNet learnt to read the mean colour from it). The
        # UNet predicts the clean latents (training.copy_path starts it as the identity edit) and is trained on
        # t >= 40 only (itsd_tiny.toml), which trailing spacing never goes below at 20 steps.
        "scheduler": {"prediction_type": "sample", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
        "sampler": {"class": "EulerDiscreteScheduler"},  # deterministic: a restoration is not a lottery
    },
    "sd15": {
        "unet": {"sample_size": 64, "cross_attention_dim": 768},  # diffusers' defaults are SD 1.5's
        "vae": {
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "sample_size": 512,
        },
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    },
}


def unet_for(preset: str, in_channels: int = 8) -> UNet2DConditionModel:
    return UNet2DConditionModel(in_channels=in_channels, out_channels=4, **PRESETS[preset]["unet"])


def vae_for(preset: str) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **PRESETS[preset]["vae"])


def text_encoder_for(preset: str) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **PRESETS[preset]["text"],
    )
    return CLIPTextModel(config)


def scheduler_for(preset: str) -> object:
    """The preset's sampler (Euler ancestral, as timbrooks/instruct-pix2pix ships, unless it names another) with
    SD 1.5's noise schedule and the preset's changes to it."""
    name = PRESETS[preset].get("sampler", {}).get("class", "EulerAncestralDiscreteScheduler")
    return getattr(diffusers, name)(**{**SD15_SCHEDULER, **PRESETS[preset].get("scheduler", {})})


def clip_tokenizer(workdir: Path) -> CLIPTokenizer:
    vocab, merges = write_clip_tokenizer_files(workdir)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def build_tiny_checkpoint(out: Path, seed: int = 0, unet_in_channels: int = 8, preset: str = "tiny") -> Path:
    """Write a complete diffusers InstructPix2Pix checkpoint (safetensors, random weights) to `out`."""
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae_for(preset),
        text_encoder=text_encoder_for(preset),
        tokenizer=clip_tokenizer(out / "_tokenizer_src"),
        unet=unet_for(preset, unet_in_channels),
        scheduler=scheduler_for(preset),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    for leftover in (out / "_tokenizer_src").iterdir():
        leftover.unlink()
    (out / "_tokenizer_src").rmdir()
    json.loads((out / "model_index.json").read_text())  # fail loudly if diffusers wrote nothing
    return out


# What a random LoRA adapts: every attention projection, the transformer blocks' convs and feed-forward, the
# ResNets' convs and time projections (as LCM-LoRA does); in the text encoder, the attention projections.
LORA_UNET_TARGETS = (
    *("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    *("conv1", "conv2", "time_emb_proj"),
)
LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_random_lora(checkpoint: Path, path: Path, rank: int = 4, seed: int = 0, text_encoder: bool = False) -> Path:
    """Write a LoRA with random (seeded) weights for `checkpoint`'s UNet (and text encoder) to `path`, in the
    diffusers/PEFT format `save_lora_weights` writes (text-encoder keys with CLIP's `text_model.` prefix, as
    published LoRAs have them). Alpha equals the rank: scale 1 adds B @ A."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    layers = {"unet_lora_layers": _random_lora(unet, LORA_UNET_TARGETS, rank)}
    if text_encoder:
        text = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
        text_layers = _random_lora(text, LORA_TEXT_TARGETS, rank)
        prefix = "" if hasattr(text, "text_model") else "text_model."
        layers["text_encoder_lora_layers"] = {prefix + key: value for key, value in text_layers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionLoraLoaderMixin.save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


def _random_lora(model: torch.nn.Module, targets: tuple[str, ...], rank: int) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, inject_adapter_in_model  # the export extra's (LoRAs are fused at export)
    from peft.utils import get_peft_model_state_dict

    # init_lora_weights=False: B random too (PEFT's default zero B would make a LoRA that changes nothing)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(targets))
    return get_peft_model_state_dict(inject_adapter_in_model(config, model))
