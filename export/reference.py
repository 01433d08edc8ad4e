"""The PyTorch baseline: diffusers' own InstructPix2Pix pipeline behind the same `Backend` interface.

`itsd edit --backend torch` and export's parity check use it. It takes its initial latents from
`core.edit.initial_latents`, so a seed gives the ONNX and torch backends the same starting noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from core.edit import initial_latents
from core.params import SCHEDULERS, EditParams, read_edit_defaults
from export.checkpoint import load_pipeline, resolve


class TorchEditPipeline:
    def __init__(self, pipe, edit_defaults: Mapping[str, float]) -> None:  # noqa: ANN001 (diffusers IP2P pipeline)
        self.pipe = pipe
        self.edit_defaults = edit_defaults
        self.pipe.set_progress_bar_config(disable=True)
        self._default_scheduler = self.pipe.scheduler

    @classmethod
    def load(cls, source: str | Path) -> TorchEditPipeline:
        folder = resolve(str(source))
        return cls(load_pipeline(folder), read_edit_defaults(folder))

    def _scheduler(self, name: str | None):  # noqa: ANN202 (a diffusers scheduler)
        if name is None:
            return self._default_scheduler
        import diffusers

        return getattr(diffusers, SCHEDULERS[name]).from_config(self._default_scheduler.config)

    @torch.no_grad()
    def generate(self, pixels: np.ndarray, instruction: str, params: EditParams, seed: int) -> np.ndarray:
        pipe = self.pipe
        pipe.scheduler = self._scheduler(params.scheduler)
        rng = np.random.default_rng(seed)
        shape = (
            1,
            pipe.vae.config.latent_channels,
            pixels.shape[2] // pipe.vae_scale_factor,
            pixels.shape[3] // pipe.vae_scale_factor,
        )
        latents = torch.from_numpy(initial_latents(rng, shape))
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))  # ancestral noise only
        output = pipe(
            instruction,
            image=torch.from_numpy((pixels + 1.0) / 2.0),  # diffusers wants [0, 1] tensors
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            image_guidance_scale=params.image_guidance_scale,
            latents=latents,
            generator=generator,
            output_type="np",
        ).images[0]
        return (output * 255.0).round().astype(np.uint8)
