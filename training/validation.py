"""Validation during training: a few held-out rows edited with the current weights, saved as a grid
(input | output | target) and logged to TensorBoard."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.config import TrainConfig
from training.models import Models, build_pipeline
from training.pairs import PairDataset


def validation_rows(pairs: PairDataset, count: int) -> list[tuple[Image.Image, Image.Image, str]]:
    """`count` rows spread evenly over the dataset, centre-cropped, with their own instruction text."""
    indices = sorted(set(np.linspace(0, len(pairs) - 1, num=min(count, len(pairs))).round().astype(int)))
    return [pairs.pair(int(index), None) for index in indices]


@torch.no_grad()
def run_validation(
    unet: torch.nn.Module,
    models: Models,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    rows: list[tuple[Image.Image, Image.Image, str]],
    cfg: TrainConfig,
    step: int,
    writer: object | None,
) -> Path:
    """Edit the validation inputs with the current weights; save a grid (input | output | target per row)
    under output_dir/validation/ and log it to TensorBoard."""
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(unet, vae, text_encoder, models)
    pipe.set_progress_bar_config(disable=True)
    device = unet.device
    autocast = torch.autocast(device.type, dtype=vae.dtype) if vae.dtype != torch.float32 else contextlib.nullcontext()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    res = cfg.resolution
    grid = Image.new("RGB", (3 * res, len(rows) * res))
    with autocast:
        for i, (original, target, instruction) in enumerate(rows):
            edited = pipe(
                instruction,
                image=original,
                num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale,
                image_guidance_scale=cfg.validation_image_guidance_scale,
                generator=generator,
            ).images[0]
            for column, image in enumerate((original, edited, target)):
                grid.paste(image.resize((res, res)), (column * res, i * res))
    unet.train(was_training)
    out = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    if writer is not None:
        writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        writer.add_text("validation/instructions", "\n\n".join(row[2] for row in rows), step)
    return out
