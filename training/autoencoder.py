"""Train the AutoencoderKL of a small model from scratch on a prepared dataset's images.

Stable Diffusion's VAE is far too big for a 30 MB model, and a random one cannot reconstruct anything, so a
small model brings its own: the autoencoder learns to reconstruct random crops (at native scale, so noise
and rain keep their statistics) of every input and target image of the dataset, with an L1 + MSE pixel loss
and a tiny KL term (it stays close to deterministic, as SD's does). Afterwards its `scaling_factor` is set
to 1 / the standard deviation of its latents, so the diffusion model sees latents of unit variance, as SD's
0.18215 does for SD's VAE. Every draw comes from generators keyed by (seed, step): a seed reproduces it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.dataset import Crop, aligned_crop, as_pil
from training.metrics import psnr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderConfig:
    steps: int = 1500  # optimizer steps; ~0.4 s each for the itsd-tiny VAE at the defaults on 2 CPU cores
    batch_size: int = 8
    resolution: int = 128  # side of the random square crops, cut at native scale (no resize)
    learning_rate: float = 1e-3  # AdamW, cosine decay to 0: a from-scratch conv net, not a fine-tune
    kl_weight: float = 1e-6  # enough to keep the posterior a distribution, too little to blur anything
    seed: int = 0
    decoder_steps: int = 0  # then steps on the decoder alone, on target images: sharper outputs, same latents


def load_images(rows: object, columns: Sequence[str]) -> list[np.ndarray]:
    """Every image of the given columns of the dataset rows, as uint8 HxWx3 arrays."""
    return [np.asarray(as_pil(row[column])) for row in rows for column in columns]


def crop_batch(images: Sequence[np.ndarray], cfg: AutoencoderConfig, step: int) -> torch.Tensor:
    """The batch of optimizer step `step`: random images, random native-scale crops and flips, in [-1, 1]."""
    rng = np.random.default_rng([cfg.seed, step])
    crop = Crop(cfg.resolution, "random", resize=False)
    patches = []
    for index in rng.integers(len(images), size=cfg.batch_size):
        (patch,) = aligned_crop([images[int(index)]], crop, rng)
        patches.append(patch[:, ::-1] if rng.random() < 0.5 else patch)
    pixels = np.stack(patches).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def start_nearly_deterministic(vae: torch.nn.Module, logvar: float = -12.0) -> None:
    """Make a fresh VAE's posterior start with log-variance `logvar` (std 0.0025): a random one starts near
    0 (std 1), and its decoder would spend most of a short training learning to ignore that noise."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(logvar)


def train_autoencoder(
    vae: torch.nn.Module, images: Sequence[np.ndarray], cfg: AutoencoderConfig, decoder_only: bool = False
) -> list[float]:
    """Train `vae` (a fresh diffusers AutoencoderKL) in place on crops of `images`; returns each step's loss.

    `decoder_only`: `cfg.decoder_steps` more steps on the decoder of a trained VAE, the encoder frozen, so the
    latent space (and a diffusion model trained on it) stays valid while decoding improves."""
    torch.manual_seed(cfg.seed)
    steps, offset = (cfg.decoder_steps, cfg.steps + 4) if decoder_only else (cfg.steps, 0)  # 4: fit_scaling_factor's
    if not decoder_only:
        start_nearly_deterministic(vae)
    trained = [vae.decoder, vae.post_quant_conv] if decoder_only else [vae]
    vae.train().requires_grad_(not decoder_only)
    params = [param for module in trained for param in module.parameters()]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    progress = tqdm(range(steps), unit="step", desc="decoder" if decoder_only else "autoencoder", mininterval=10)
    for step in progress:
        pixels = crop_batch(images, cfg, offset + step)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + offset + step)
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(pixels).latent_dist
        decoded = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels) + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def fit_scaling_factor(vae: torch.nn.Module, images: Sequence[np.ndarray], cfg: AutoencoderConfig) -> float:
    """Set (and return) the VAE's `scaling_factor`: 1 / std of the latent means over a few batches (drawn
    past the training steps)."""
    latents = torch.cat([vae.encode(crop_batch(images, cfg, cfg.steps + i)).latent_dist.mode() for i in range(4)])
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def reconstruction_psnr(vae: torch.nn.Module, images: Sequence[np.ndarray]) -> float:
    """Mean PSNR (dB) of whole images passed through the VAE (latent mode), cut to multiples of 8 px."""
    figures = []
    for image in images:
        h, w = image.shape[0] // 8 * 8, image.shape[1] // 8 * 8
        x = torch.from_numpy(image[:h, :w].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].permute(1, 2, 0).numpy()
        figures.append(psnr(np.clip(np.round((y + 1.0) * 127.5), 0, 255).astype(np.uint8), image[:h, :w]))
    return float(np.mean(figures))
