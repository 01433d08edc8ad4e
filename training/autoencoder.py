"""The pixel autoencoder of a small model: a diffusers AutoencoderKL whose weights are set, not trained, so
that its latents are the image itself.

Stable Diffusion's VAE is far too big for a 30 MB model, and a small one trained from scratch on a CPU budget
reconstructs below the noisy and blurred inputs it is meant to restore (docs/itsd-tiny-history.md). Restoration
needs the detail, so itsd-tiny diffuses in pixel space: a one-level AutoencoderKL (no downsampling) whose latent
channels are R, G, B and their mean.

Every block of a diffusers encoder or decoder is a residual block (identity when its last convolution is
zero) except the GroupNorm + SiLU before `conv_out`, which normalizes by statistics of the whole image. The
construction makes that part linear: a signal x enters a group as the pair (x, -x) beside a constant `level`
channel, so the group's mean and spread are set by `level` (x and -x cancel in the mean, and x adds only
mean(x^2)/2 to a variance of 3 level^2/16), and SiLU(a + x/s) - SiLU(a - x/s) is odd in x: its error is of
third order. `conv_out` reads x back from that difference. Reconstruction is near the 8-bit limit (tests
check > 45 dB), and the graph is an ordinary AutoencoderKL that diffusers, the exporter and the workers load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from training.metrics import psnr
from training.pairs import to_tensor

SIGNALS = 3  # R, G, B; the fourth latent channel is their mean
LEVEL = 10.0  # the constant channel: group statistics of ~level^2, which fp16 holds as well as fp32


def _silu_slope(a: float) -> float:
    s = 1.0 / (1.0 + math.exp(-a))
    return s * (1.0 + a * (1.0 - s))


def readout_gain(level: float, k: int) -> float:
    """The weight that reads a signal x back, as gain * (SiLU(n(x)) - SiLU(n(-x))), after a GroupNorm (weight 1,
    bias 0) whose group of `k` channels holds x, -x, the constant `level` and k - 3 channels near 0."""
    spread = level * math.sqrt(k - 1) / k  # the std of the group (x small)
    return spread / (2.0 * _silu_slope(-1.0 / math.sqrt(k - 1)))  # -1/sqrt(k-1): where the channels sit


def check_pixel_layout(vae: torch.nn.Module) -> int:
    """The channels per GroupNorm group of a VAE that `make_pixel_autoencoder` can set; a clear error if its
    config cannot hold the construction."""
    cfg = vae.config
    channels, groups = cfg.block_out_channels[-1], cfg.norm_num_groups
    problems = []
    if len(cfg.block_out_channels) != 1:
        problems.append(f"{len(cfg.block_out_channels)} levels (a pixel autoencoder has one: no downsampling)")
    if cfg.in_channels != 3 or cfg.out_channels != 3 or cfg.latent_channels != SIGNALS + 1:
        problems.append("3 image channels and 4 latent channels are needed")
    if groups < SIGNALS or channels % groups or channels // groups < 4:
        problems.append(f"{channels} channels in {groups} groups (at least {SIGNALS} groups of 4 are needed)")
    if cfg.mid_block_add_attention:
        problems.append("mid-block attention (set mid_block_add_attention=False)")
    if problems:
        raise ValueError("cannot make a pixel autoencoder of this VAE: " + "; ".join(problems))
    return channels // groups


@torch.no_grad()
def make_pixel_autoencoder(vae: torch.nn.Module, level: float = LEVEL) -> torch.nn.Module:
    """Set the weights of `vae` (a one-level diffusers AutoencoderKL) so that encode gives latents
    (R, G, B, mean) of the [-1, 1] image with log-variance -12, and decode gives the image back. In place."""
    k = check_pixel_layout(vae)
    gain = readout_gain(level, k)
    for param in vae.parameters():
        param.zero_()  # every residual branch ends in a zero convolution: each block passes its input through
    for module in vae.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.fill_(1.0)
    centre = vae.encoder.conv_in.weight.shape[-1] // 2
    for conv_in in (vae.encoder.conv_in, vae.decoder.conv_in):
        for g in range(SIGNALS):
            conv_in.weight[k * g, g, centre, centre] = 1.0
            conv_in.weight[k * g + 1, g, centre, centre] = -1.0
            conv_in.bias[k * g + 2] = level
    readouts = [(vae.encoder.conv_out, range(SIGNALS + 1)), (vae.decoder.conv_out, range(SIGNALS))]
    for conv_out, outputs in readouts:
        for out in outputs:
            for g in range(SIGNALS) if out == SIGNALS else (out,):  # the fourth latent: the mean of the three
                weight = gain / SIGNALS if out == SIGNALS else gain
                conv_out.weight[out, k * g, centre, centre] = weight
                conv_out.weight[out, k * g + 1, centre, centre] = -weight
    latent = vae.config.latent_channels
    vae.quant_conv.weight[:latent, :latent, 0, 0] = torch.eye(latent)
    vae.quant_conv.bias[latent:] = -12.0  # log-variance: std 0.0025, as good as deterministic
    vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(latent)
    return vae.eval().requires_grad_(False)


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> a batch of one, 1x3xHxW in [-1, 1] (the training pipeline's conversion)."""
    return to_tensor(image)[None]


@torch.no_grad()
def fit_scaling_factor(vae: torch.nn.Module, images: Sequence[np.ndarray]) -> float:
    """Set (and return) the VAE's `scaling_factor`: 1 / the std of the latent means of `images`, so the diffusion
    model sees latents of unit variance (SD's 0.18215 does this for SD's VAE)."""
    latents = torch.cat([vae.encode(to_pixels(image)).latent_dist.mode().flatten() for image in images])
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def reconstruction_psnr(vae: torch.nn.Module, images: Sequence[np.ndarray]) -> float:
    """Mean PSNR (dB) of whole images passed through the VAE (latent mode), cut to multiples of 8 px."""
    figures = []
    for image in images:
        h, w = image.shape[0] // 8 * 8, image.shape[1] // 8 * 8
        y = vae.decode(vae.encode(to_pixels(image[:h, :w])).latent_dist.mode()).sample[0].permute(1, 2, 0).numpy()
        figures.append(psnr(np.clip(np.round((y + 1.0) * 127.5), 0, 255).astype(np.uint8), image[:h, :w]))
    return float(np.mean(figures))
