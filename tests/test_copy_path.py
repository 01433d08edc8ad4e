"""`training.copy_path`: a from-scratch itsd-tiny UNet given the copy path returns the image's latents, scaled,
at every timestep and whatever the text; a UNet that cannot hold the path is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from training.copy_path import make_copy_path
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
