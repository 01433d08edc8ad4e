"""`training.autoencoder`: a from-scratch VAE learns to reconstruct, is reproducible for a seed, and gets a
scaling factor that gives its latents unit variance."""

from __future__ import annotations

import numpy as np
import torch
from skimage import data as skdata

from training.autoencoder import (
    AutoencoderConfig,
    crop_batch,
    fit_scaling_factor,
    reconstruction_psnr,
    train_autoencoder,
)
from training.tiny import vae_for

CFG = AutoencoderConfig(steps=30, batch_size=4, resolution=32, learning_rate=2e-3, seed=3)


def images() -> list[np.ndarray]:
    return [skdata.astronaut()[::8, ::8].copy(), skdata.coffee()[::8, ::8].copy()]


def fresh_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return vae_for("itsd-tiny")


def test_the_itsd_tiny_vae_halves_the_image_side():
    vae = fresh_vae()
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 32, 32)


def test_training_lowers_the_loss_and_raises_the_reconstruction_psnr():
    vae = fresh_vae()
    before = reconstruction_psnr(vae, images())
    losses = train_autoencoder(vae, images(), CFG)

    assert len(losses) == CFG.steps and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert reconstruction_psnr(vae, images()) > before + 3


def test_the_same_seed_gives_the_same_losses_and_weights():
    first, second = fresh_vae(), fresh_vae()
    cfg = AutoencoderConfig(**{**CFG.__dict__, "steps": 4})
    assert train_autoencoder(first, images(), cfg) == train_autoencoder(second, images(), cfg)
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_batches_are_keyed_by_step_and_stay_in_the_signed_unit_range():
    batch = crop_batch(images(), CFG, 7)
    assert batch.shape == (4, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    assert torch.equal(batch, crop_batch(images(), CFG, 7))
    assert not torch.equal(batch, crop_batch(images(), CFG, 8))


def test_the_scaling_factor_gives_latents_unit_standard_deviation():
    vae = fresh_vae()
    train_autoencoder(vae, images(), AutoencoderConfig(**{**CFG.__dict__, "steps": 3}))
    factor = fit_scaling_factor(vae, images(), CFG)

    assert vae.config.scaling_factor == factor
    latents = torch.cat([vae.encode(crop_batch(images(), CFG, CFG.steps + i)).latent_dist.mode() for i in range(4)])
    assert abs(float((latents * factor).std()) - 1.0) < 1e-4


def test_decoder_only_training_keeps_the_latent_space_and_improves_decoding():
    vae = fresh_vae()
    cfg = AutoencoderConfig(**{**CFG.__dict__, "steps": 10, "decoder_steps": 20})
    train_autoencoder(vae, images(), cfg)
    encoder = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder", "post_quant"))}
    before = reconstruction_psnr(vae, images())
    losses = train_autoencoder(vae, images(), cfg, decoder_only=True)

    assert len(losses) == cfg.decoder_steps
    state = vae.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder.items())
    assert reconstruction_psnr(vae, images()) > before
