"""`training.copy_path`: a from-scratch itsd-tiny UNet given the copy path returns the image's latents, scaled,
at every timestep and whatever the text; a UNet that cannot hold the path is refused with the reason; muted, no
feature of it depends on the noisy latents until training says so."""

from __future__ import annotations

import pytest
import torch

from training.copy_path import make_copy_path, mute_noisy_latents
from training.tiny import unet_for


def test_the_copy_path_makes_the_untrained_unet_the_identity_edit_at_every_timestep():
    torch.manual_seed(0)
    unet = unet_for("itsd-tiny").eval()
    image = torch.rand(1, 3, 48, 48) * 2 - 1
    latents = torch.cat([image, image.mean(1, keepdim=True)], dim=1)
    noisy = torch.randn(1, 4, 48, 48)

    def error(t: int) -> float:
        with torch.no_grad():
            out = unet(torch.cat([noisy, latents], 1), torch.tensor([t]), torch.randn(1, 77, 32)).sample
        return float((out - 1.6 * latents).pow(2).mean().sqrt())

    assert error(999) > 0.5  # random weights: nothing like the image
    make_copy_path(unet, scale=1.6)
    for t in (999, 500, 40):
        assert error(t) < 0.05  # ~1.5% of the latents' range


def test_a_unet_that_cannot_hold_the_path_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"needs 8 input .* \(got 4 in"):
        make_copy_path(unet_for("itsd-tiny", in_channels=4), scale=1.0)  # no image latents to copy


def test_muted_noisy_latents_reach_no_feature_and_the_copy_path_stays():
    torch.manual_seed(0)
    unet = make_copy_path(unet_for("itsd-tiny").eval(), scale=1.6)
    rgb, text = torch.rand(1, 3, 48, 48) * 2 - 1, torch.randn(1, 77, 32)
    image = torch.cat([rgb, rgb.mean(1, keepdim=True)], dim=1)
    features: list[torch.Tensor] = []
    unet.mid_block.register_forward_hook(lambda module, args, out: features.append(out))

    def run(noisy: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return unet(torch.cat([noisy, image], 1), torch.tensor([999]), text).sample

    run(torch.randn(1, 4, 48, 48)), run(torch.randn(1, 4, 48, 48))
    assert not torch.equal(features[0], features[1])  # random conv_in weights carry the noise everywhere
    mute_noisy_latents(unet)
    out = run(torch.randn(1, 4, 48, 48))
    assert torch.equal(run(torch.randn(1, 4, 48, 48)), out)
    assert torch.equal(features[-1], features[-2])
    assert float((out - 1.6 * image).pow(2).mean().sqrt()) < 0.05
