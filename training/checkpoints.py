"""Checkpoints and the product of a run: resumable training state (`checkpoint-<step>/`, with the step the
data sampler restarts from) and the final diffusers IP2P folder that `itsd export` takes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from core.params import EDIT_DEFAULTS_FILE
from training.config import ConfigError
from training.models import build_pipeline, load_models

log = logging.getLogger(__name__)
STATE_FILE = "itsd_state.json"  # inside each checkpoint: the step (= the data sampler's state)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else []:
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """`resume` "" -> None; "latest" -> the newest checkpoint in output_dir (None if there is none); else a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            log.warning("resume=latest but %s has no checkpoint: starting from scratch", output_dir)
            return None
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume: {path} is not a checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator: object, output_dir: Path, step: int, total_limit: int) -> Path:
    """Full training state (UNet, optimizer, grad scaler, RNGs, EMA, step) into output_dir/checkpoint-<step>,
    first deleting the oldest checkpoints so at most `total_limit` remain (0 = keep all)."""
    path = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process and total_limit > 0:
        existing = [p for s, p in list_checkpoints(output_dir) if s != step]
        for old in existing[: max(0, len(existing) - (total_limit - 1))]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    return path


def save_final(
    unet: torch.nn.Module,
    pretrained: Path,
    out: Path,
    text_encoder: torch.nn.Module | None = None,
    native_size: int | None = None,
) -> Path:
    """The diffusers IP2P checkpoint folder (safetensors): the trained UNet (and text encoder, when it was
    trained) with fp32 frozen parts reloaded from `pretrained`, so nothing passes through a half-precision
    round trip. The UNet's sample size records `native_size` (px, stored in latents): the tile side that
    export writes into the manifest and that large images are edited in."""
    fresh = load_models(pretrained, with_unet=False)
    if native_size is not None:
        vae_scale = 2 ** (len(fresh.vae.config.block_out_channels) - 1)
        unet.register_to_config(sample_size=native_size // vae_scale)
    for model in (unet, text_encoder):
        if model is not None and model.dtype != torch.float32:
            model.to(dtype=torch.float32)
    pipe = build_pipeline(unet, fresh.vae, text_encoder or fresh.text_encoder, fresh)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_edit_defaults(checkpoint: Path, defaults: dict[str, float]) -> None:
    """The checkpoint's recommended steps and guidance scales (core.params), when there are any."""
    if defaults:
        (checkpoint / EDIT_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
