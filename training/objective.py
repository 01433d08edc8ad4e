"""The training objective: the loss of one micro-batch, and the draws and targets it is made of.

The UNet learns to predict the noise (or v, or the clean latents, by the scheduler's `prediction_type`) added to
the *edited* image's latents, given the noisy latents concatenated with the *input* image's latents (8 UNet
input channels) and the instruction's embedding. With probability p per sample the text is replaced by the
empty prompt's embedding, the image latents are zeroed, or both (diffusers' `train_instruct_pix2pix.py`), so the
model also learns the unconditional predictions that classifier-free guidance needs at inference. Every draw
takes the micro-batch's generator, so a step gives the same loss on any resume.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.models import Models, Trained
from training.pairs import tokenize


class Objective:
    """The loss of one micro-batch, with its backward pass: the diffusion loss of the edited image's latents
    given the input's, weighted per sample, plus the task head's cross entropy when it is trained."""

    def __init__(
        self, cfg: TrainConfig, accelerator: Any, models: Models, trained: Trained, weight_dtype: torch.dtype
    ) -> None:
        self.cfg, self.accelerator, self.trained, self.weight_dtype = cfg, accelerator, trained, weight_dtype
        self.vae, self.noise_scheduler = models.vae, models.noise_scheduler
        self.text_encoder = trained.text_encoder or models.text_encoder
        # the empty prompt's embedding replaces dropped instructions
        self.null_ids = tokenize(models.tokenizer, [""]).to(accelerator.device)
        with torch.no_grad():
            self.null_text = self.text_encoder(self.null_ids, return_dict=False)[0]

    def __call__(self, batch: dict, gen: torch.Generator, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(diffusion loss, task loss, or 0), detached; `sync`: the step's last micro-batch, whose backward
        synchronises the gradients across processes."""
        cfg, device, unet, head = self.cfg, self.accelerator.device, self.trained.unet, self.trained.head
        latents, image_latents, text = encode_batch(batch, self.vae, self.text_encoder, gen, self.weight_dtype)
        loss_weights = sample_weights(
            cfg.loss_weighting,
            latents,
            image_latents * self.vae.config.scaling_factor,
            cfg.input_error_floor,
            cfg.input_error_ceiling,
        )
        if cfg.train_text_encoder:  # a trained encoder moves the empty prompt's embedding too
            self.null_text = self.text_encoder(self.null_ids, return_dict=False)[0]
        task_logits = head(text.mean(1)) if head is not None else None
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        timesteps = draw_timesteps(latents.shape[0], self.noise_scheduler.config.num_train_timesteps, cfg, gen)
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        text, image_latents = conditioning_dropout(
            text, image_latents, self.null_text, cfg.conditioning_dropout_prob, gen
        )
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        task_loss = torch.zeros((), device=device)
        with contextlib.ExitStack() as no_sync:
            for model in [] if sync else self.trained.modules():
                no_sync.enter_context(self.accelerator.no_sync(model))
            pred = unet(torch.cat([noisy, image_latents], dim=1), timesteps, text, return_dict=False)[0]
            errors = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
            loss = total = (errors * loss_weights).mean()
            if task_logits is not None:
                task_loss = F.cross_entropy(task_logits.float(), batch["task"].to(device))
                total = loss + cfg.text_task_loss_weight * task_loss
            self.accelerator.backward(total / cfg.gradient_accumulation_steps)
        return loss.detach(), task_loss.detach()


def encode_batch(
    batch: dict, vae: torch.nn.Module, text_encoder: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target latents sampled and scaled by the VAE's scaling factor, input-image latents from the VAE's
    mode and not scaled, as the IP2P pipeline makes them at inference; instruction embeddings, with their
    graph when the text encoder is being trained)."""
    device = vae.device
    with torch.no_grad():
        edited = batch["edited"].to(device, dtype)
        original = batch["original"].to(device, dtype)
        latents = vae.encode(edited).latent_dist.sample(generator) * vae.config.scaling_factor
        image_latents = vae.encode(original).latent_dist.mode()
    with torch.set_grad_enabled(text_encoder.training):
        text = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    return latents, image_latents, text


def draw_timesteps(count: int, total: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """`count` timesteps from [min_timestep, total): uniform, or with the latest `timestep_bias_portion` of the
    range drawn `timestep_bias_multiplier` times as often (diffusers' "later" timestep bias)."""
    if cfg.timestep_bias_multiplier == 1.0:
        return torch.randint(cfg.min_timestep, total, (count,), generator=gen)
    weights = torch.ones(total - cfg.min_timestep)
    weights[len(weights) - max(1, round(cfg.timestep_bias_portion * len(weights))) :] *= cfg.timestep_bias_multiplier
    return cfg.min_timestep + torch.multinomial(weights, count, replacement=True, generator=gen)


def training_target(
    noise_scheduler: object, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict, by the scheduler's `prediction_type`: the noise, the velocity, or the
    clean latents themselves ("sample")."""
    kind = noise_scheduler.config.prediction_type
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    if kind == "epsilon":
        return noise
    raise ValueError(f"unsupported prediction_type {kind!r}: epsilon, v_prediction or sample")


def sample_weights(
    weighting: str, latents: torch.Tensor, input_latents: torch.Tensor, floor: float, ceiling: float = 0.0
) -> torch.Tensor:
    """Per-sample loss weights: ones ("uniform"), or 1 / the mean squared error of the input's latents (scaled as
    the target's) against the target's, clamped to [floor, ceiling] (no ceiling if 0) ("input_error"): the identity
    edit then scores 1 on every sample whose input error lies between them."""
    if weighting == "uniform":
        return torch.ones(latents.shape[0], device=latents.device)
    error = (input_latents.float() - latents.float()).pow(2).mean((1, 2, 3))
    return 1.0 / error.clamp(min=floor, max=ceiling or None)


def conditioning_dropout(
    text: torch.Tensor, image_latents: torch.Tensor, null_text: torch.Tensor, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample r ~ U[0,1): r < 2p drops the text (empty-prompt embedding), p <= r < 3p zeroes the image
    latents; so p each of text only, both, image only (diffusers' train_instruct_pix2pix.py)."""
    r = torch.rand(text.shape[0], generator=generator).to(text.device)
    drop_text = (r < 2 * prob).reshape(-1, 1, 1)
    keep_image = ~((r >= prob) & (r < 3 * prob))
    text = torch.where(drop_text, null_text.to(text.dtype), text)
    image_latents = image_latents * keep_image.reshape(-1, 1, 1, 1).to(image_latents.dtype)
    return text, image_latents
