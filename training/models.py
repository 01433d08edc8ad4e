"""The models a run loads and trains: a checkpoint's parts (`load_models`), an SD UNet widened to IP2P's 8
input channels, the optional task head, and the named record of what the optimizer updates (`Trained`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import InvalidModel
from training.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Models:
    tokenizer: object  # CLIPTokenizer
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler built from the checkpoint's scheduler config (training noise)
    sampling_scheduler: object  # the scheduler validation and final/ use


def load_models(pretrained: Path, with_unet: bool = True) -> Models:
    """Load a diffusers checkpoint folder; a 4-channel (SD) UNet gets `conv_in` widened to 8 channels.

    Validation and final/ sample with the checkpoint's own scheduler, except that an SD source gets
    EulerAncestralDiscreteScheduler (what timbrooks/instruct-pix2pix ships) built from its config.
    """
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet_config = pretrained / "unet" / "config.json"
    if not unet_config.is_file():
        raise InvalidModel(f"{pretrained}: not a diffusers checkpoint folder (no unet/config.json)")
    in_channels = json.loads(unet_config.read_text()).get("in_channels")
    if in_channels not in (4, 8):
        raise InvalidModel(f"{pretrained}: UNet has {in_channels} input channels; expected 8 (IP2P) or 4 (SD)")
    unet: torch.nn.Module = torch.nn.Identity()
    if with_unet:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
        if in_channels == 4:
            log.info("%s has a 4-channel UNet (Stable Diffusion): widening conv_in to 8 channels", pretrained)
            unet = widen_conv_in(unet)
    scheduler_config = DDPMScheduler.load_config(pretrained, subfolder="scheduler")
    sampling_cls = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
    if in_channels == 4 or sampling_cls is None:
        sampling_cls = EulerAncestralDiscreteScheduler
    return Models(
        tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae"),
        unet=unet,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        sampling_scheduler=sampling_cls.from_config(scheduler_config),
    )


def widen_conv_in(unet: torch.nn.Module, in_channels: int = 8) -> torch.nn.Module:
    """Give an SD UNet the extra input channels IP2P needs: new channels zero, old weights and bias copied.

    Deterministic (no random init), so every process builds the same model; with the extra inputs at zero
    the widened UNet computes exactly what the original did. (diffusers' script leaves the bias random:
    diffusers issue 4960.)
    """
    old = unet.conv_in
    new = torch.nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def task_head(text_encoder: torch.nn.Module, tasks: Sequence[str]) -> torch.nn.Module:
    """The linear classifier of `text_task_loss_weight`: the text encoder's mean token state -> one logit per task."""
    if len(tasks) < 2:
        raise ConfigError(f"text_task_loss_weight needs rows of at least two tasks (the dataset has {list(tasks)})")
    return torch.nn.Linear(text_encoder.config.hidden_size, len(tasks))


def parameters_of(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters of every trained module, in one fixed order (optimizer, EMA and clipping agree)."""
    return [param for module in modules for param in module.parameters()]


def build_pipeline(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, models: Models
) -> object:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=models.tokenizer,
        unet=unet,
        scheduler=models.sampling_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass
class Trained:
    """What the optimizer updates, by name: the UNet; the text encoder when `train_text_encoder`; the task head
    when `text_task_loss_weight`. `modules` is the fixed order the optimizer, EMA, clipping and accelerate see."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None = None
    head: torch.nn.Module | None = None

    def modules(self) -> list[torch.nn.Module]:
        return [module for module in (self.unet, self.text_encoder, self.head) if module is not None]

    def replaced(self, modules: Sequence[torch.nn.Module]) -> Trained:
        """The same roles filled by `modules` (as `accelerator.prepare` or `unwrap_model` return them)."""
        given = iter(modules)
        return Trained(
            *(next(given) if module is not None else None for module in (self.unet, self.text_encoder, self.head))
        )
