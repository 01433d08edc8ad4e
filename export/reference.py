"""The PyTorch baseline: a diffusers checkpoint's modules behind the same `core.edit.Backend` interface.

`itsd edit --backend torch` runs `core.edit`'s tiled loop over the checkpoint's own torch modules, so it
gives the ONNX backend's image (same tiles, noise and schedulers); export's parity check compares the two
on a multi-tile probe. `diffusers_generate` runs diffusers' own `StableDiffusionInstructPix2PixPipeline`
instead: the untiled reference the loop is held to on a single-tile probe, with the loop's noise throughout
(`numpy_noise`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

from core.edit import ModelFacts, initial_latents
from core.params import SCHEDULERS, EditParams, read_edit_defaults
from export.checkpoint import load_pipeline, resolve

# The diffusers modules of ported schedulers whose `step` draws fresh noise, each through its own `randn_tensor`.
_NOISY_SCHEDULERS = (scheduling_euler_ancestral_discrete, scheduling_lcm)
_NOISE_PATCH = threading.Lock()  # the patch is process-wide: one holder at a time


@contextmanager
def numpy_noise(rng: np.random.Generator) -> Iterator[None]:
    """While open, diffusers' noisy schedulers draw each step's noise from `rng` as `core.edit`'s loop does:
    float32 standard normals of the model output's shape, in step order. Other threads that open it wait."""

    def draw(shape: tuple[int, ...], dtype: torch.dtype | None = None, **_: object) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(dtype or torch.float32)

    with _NOISE_PATCH:
        originals = [module.randn_tensor for module in _NOISY_SCHEDULERS]
        for module in _NOISY_SCHEDULERS:
            module.randn_tensor = draw
        try:
            yield
        finally:
            for module, original in zip(_NOISY_SCHEDULERS, originals, strict=True):
                module.randn_tensor = original


def native_size(pipe) -> int:  # noqa: ANN001 (diffusers IP2P pipeline)
    """The pixel side the UNet was made for: its sample size (the smaller side if two) times the VAE's scale."""
    sample = pipe.unet.config.sample_size
    return int(min(sample) if isinstance(sample, list | tuple) else sample) * pipe.vae_scale_factor


class TorchEditPipeline:
    def __init__(self, pipe, edit_defaults: Mapping[str, Any]) -> None:  # noqa: ANN001 (diffusers IP2P pipeline)
        self.pipe = pipe
        self.edit_defaults = edit_defaults
        self.pipe.set_progress_bar_config(disable=True)
        self._default_scheduler = self.pipe.scheduler
        self.facts = ModelFacts(
            latent_channels=pipe.vae.config.latent_channels,
            vae_scale_factor=pipe.vae_scale_factor,
            latent_scaling_factor=float(pipe.vae.config.scaling_factor),
            tile_size=native_size(pipe),
            scheduler_config=dict(pipe.scheduler.config),
        )

    @property
    def label(self) -> str:
        """What runs the modules, as the artifact pipelines' labels say it: "torch cpu float32"."""
        return f"torch {self.pipe.device.type} {str(self.pipe.unet.dtype).removeprefix('torch.')}"

    @classmethod
    def load(cls, source: str | Path) -> TorchEditPipeline:
        folder = resolve(str(source))
        return cls(load_pipeline(folder), read_edit_defaults(folder))

    @torch.no_grad()
    def encode_text(self, text: str) -> np.ndarray:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        return self.pipe.text_encoder(torch.tensor(ids.input_ids))[0].numpy()

    @torch.no_grad()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.pipe.vae.encode(torch.from_numpy(pixels)).latent_dist.mode().numpy()

    @torch.no_grad()
    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        tensors = (torch.from_numpy(a) for a in (sample, timestep, text))
        return self.pipe.unet(*tensors, return_dict=False)[0].numpy()

    @torch.no_grad()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.pipe.vae.decode(torch.from_numpy(latents), return_dict=False)[0].numpy()


@torch.no_grad()
def diffusers_generate(
    backend: TorchEditPipeline, pixels: np.ndarray, instruction: str, params: EditParams, seed: int
) -> np.ndarray:
    """diffusers' own pipeline, untiled: float32 [1, 3, H, W] in [-1, 1] -> uint8 [H, W, 3]; `params` resolved.
    Its initial latents come from `core.edit.initial_latents` and its schedulers' per-step noise from the same
    generator after them, so a seed means the loop's noise, ancestral and LCM sampling included. A guidance
    cutoff (`guidance_until` < 1) is a step-end callback, as diffusers' `SDCFGCutoffCallback` makes one."""
    pipe = backend.pipe
    pipe.scheduler = backend._default_scheduler
    if params.scheduler is not None:
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[params.scheduler]).from_config(pipe.scheduler.config)
    rng = np.random.default_rng(seed)
    shape = (1, backend.facts.latent_channels, *(side // pipe.vae_scale_factor for side in pixels.shape[2:]))
    latents = torch.from_numpy(initial_latents(rng, shape))
    with numpy_noise(rng):
        output = pipe(
            instruction,
            image=torch.from_numpy((pixels + 1.0) / 2.0),  # diffusers wants [0, 1] tensors
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale if params.guided_steps else 1.0,  # guided for no step: not at all
            image_guidance_scale=params.image_guidance_scale,
            latents=latents,
            callback_on_step_end=guidance_cutoff(params.guided_steps) if params.guided_steps < params.steps else None,
            callback_on_step_end_tensor_inputs=["prompt_embeds", "image_latents"],
            output_type="np",
        ).images[0]
    return (output * 255.0).round().astype(np.uint8)


def guidance_cutoff(guided_steps: int) -> Callable[..., dict[str, torch.Tensor]]:
    """A step-end callback for diffusers' InstructPix2Pix pipeline that ends guidance after `guided_steps` steps
    (at least one: diffusers calls it after a step): from then on its UNet batch is the text+image copy alone,
    as in `core.edit`. `SDCFGCutoffCallback` does this for text-to-image pipelines, whose copies differ."""

    def cutoff(pipe, step_index: int, timestep: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict:  # noqa: ANN001
        if step_index == guided_steps - 1:
            pipe._guidance_scale = 1.0  # diffusers guides only above 1
            return {name: tensor[:1] for name, tensor in tensors.items()}  # [text+image, image only, neither]
        return tensors

    return cutoff
