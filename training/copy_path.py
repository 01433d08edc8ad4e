"""A linear copy path through a from-scratch UNet, so that the model starts as the identity edit.

A UNet's last GroupNorm (`conv_norm_out`) normalizes each group by its mean and spread over the whole image, so
what comes out cannot follow the absolute level of what went in: itsd-tiny, trained from random weights,
learned the edits but painted held-out photos 41-56 levels too red, which cost it more PSNR than the edits
won. This sets weights of an `UNet2DConditionModel` that predicts the clean latents (`prediction_type =
"sample"`) so that, before training, it returns `scale` times the conditioning image's latents at every
timestep, along a path that is linear end to end:

    conv_in (the image latents' first three channels, as they are)
      -> the full-resolution skip -> the last up block's last ResNet shortcut: (x, -x, level) per group
      -> conv_norm_out (the construction of training.autoencoder: the constant `level` sets the group's
         statistics, so the group passes x through) -> SiLU -> conv_out (reads x back)

Everything else keeps its random initialization; conv_out reads only the path, so the rest of the network
starts silent (as ControlNet's zero convolutions) and training adds the edit on top of the copy.

`mute_noisy_latents` zeroes what conv_in reads from the noisy latents. A 1-step model is trained mostly at t = 999,
where with zero terminal SNR they are pure noise: random weights on them fill every feature with that noise,
which the network must first learn to cancel (InstructPix2Pix zero-initializes the channels it adds to conv_in,
for the same reason). Muted, it starts as a regression from the image and the instruction; the weights grow
where the noisy latents carry something (t < 999). The measured difference is in docs/itsd-tiny-history.md.
"""

from __future__ import annotations

import torch

from training.autoencoder import SIGNALS, readout_gain


@torch.no_grad()
def make_copy_path(unet: torch.nn.Module, scale: float, level: float = 10.0) -> torch.nn.Module:
    """Set `unet` (a diffusers UNet2DConditionModel with 8 input channels: noisy latents, then the image's
    latents R, G, B, mean) to output `scale` * the image's latents at every timestep. In place."""
    norm = unet.conv_norm_out
    k = norm.num_channels // norm.num_groups if norm is not None else 0
    latent = unet.config.out_channels
    resnet = unet.up_blocks[-1].resnets[-1]  # its skip input (the last channels) is conv_in's output
    shortcut = resnet.conv_shortcut
    if unet.config.in_channels != 2 * latent or latent != SIGNALS + 1 or k < 4 or shortcut is None:
        raise ValueError(
            "a copy path needs 8 input and 4 output channels and at least 4 channels per group at full "
            f"resolution, and a last up block that widens (got {unet.config.in_channels} in, {latent} out, {k} per "
            "group)"
        )
    conv_in, centre = unet.conv_in, unet.conv_in.weight.shape[-1] // 2
    conv_in.weight[:SIGNALS] = 0.0
    conv_in.bias[:SIGNALS] = 0.0
    for g in range(SIGNALS):
        conv_in.weight[g, latent + g, centre, centre] = 1.0
    skip = shortcut.weight.shape[1] - conv_in.out_channels
    for g in range(SIGNALS):
        for j, (weight, bias) in enumerate(((1.0, 0.0), (-1.0, 0.0), (0.0, level))):
            row = k * g + j
            shortcut.weight[row] = 0.0
            shortcut.weight[row, skip + g] = weight
            shortcut.bias[row] = bias
            resnet.conv2.weight[row] = 0.0  # the ResNet's own branch adds nothing to the path at first
            resnet.conv2.bias[row] = 0.0
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    conv_out, centre = unet.conv_out, unet.conv_out.weight.shape[-1] // 2
    conv_out.weight.zero_()
    conv_out.bias.zero_()
    gain = readout_gain(level, k) * scale
    for out in range(latent):
        for g in range(SIGNALS) if out == SIGNALS else (out,):  # the fourth latent: the mean of the three
            weight = gain / SIGNALS if out == SIGNALS else gain
            conv_out.weight[out, k * g, centre, centre] = weight
            conv_out.weight[out, k * g + 1, centre, centre] = -weight
    return unet


@torch.no_grad()
def mute_noisy_latents(unet: torch.nn.Module) -> torch.nn.Module:
    """Zero `unet.conv_in`'s weights on the noisy latents (its first `out_channels` inputs), so that before
    training nothing in the network depends on them. In place."""
    unet.conv_in.weight[:, : unet.config.out_channels] = 0.0
    return unet
