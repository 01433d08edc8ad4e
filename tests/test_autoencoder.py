"""`training.autoencoder`: the itsd-tiny VAE made a pixel autoencoder reconstructs photos near the 8-bit limit,
its latents are the image, and a scaling factor gives them unit variance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from training.autoencoder import (
    fit_scaling_factor,
    make_pixel_autoencoder,
    reconstruction_psnr,
    to_pixels,
)
from training.tiny import vae_for


def images() -> list[np.ndarray]:
    return [skdata.astronaut()[::4, ::4].copy(), skdata.coffee()[::4, ::4].copy()]


def pixel_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_pixel_autoencoder(vae_for("itsd-tiny"))


def test_a_random_vae_reconstructs_nothing_and_the_pixel_autoencoder_reconstructs_near_the_8_bit_limit():
    torch.manual_seed(0)
    assert reconstruction_psnr(vae_for("itsd-tiny").eval(), images()) < 15.0
    assert reconstruction_psnr(pixel_vae(), images()) > 45.0


def test_the_latents_are_the_image_and_its_channel_mean_with_a_near_deterministic_posterior():
    image = images()[0]
    posterior = pixel_vae().encode(to_pixels(image)).latent_dist
    pixels = to_pixels(image)[0]
    latents = posterior.mode()[0]
    assert latents.shape == (4, *image.shape[:2])
    assert torch.allclose(latents[:3], pixels, atol=0.02)
    assert torch.allclose(latents[3], pixels.mean(dim=0), atol=0.02)
    assert torch.allclose(posterior.std, torch.full_like(posterior.std, float(np.exp(-6.0))))


def test_the_scaling_factor_gives_latents_unit_standard_deviation():
    vae = pixel_vae()
    factor = fit_scaling_factor(vae, images())
    assert vae.config.scaling_factor == pytest.approx(factor)
    latents = torch.cat([vae.encode(to_pixels(image)).latent_dist.mode().flatten() for image in images()])
    assert float((latents * factor).std()) == pytest.approx(1.0, rel=1e-4)


def test_a_vae_that_cannot_hold_the_construction_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="4 levels"):
        make_pixel_autoencoder(vae_for("tiny"))
