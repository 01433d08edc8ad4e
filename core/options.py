"""The edit-parameter options `edit`, `submit` and `run` share, defined once as a click decorator."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from core.errors import InvalidParameters
from core.params import SCHEDULERS, EditParams

_DEFAULTS = EditParams()


def edit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --steps ... --max-side to a command; it receives them as one `params: EditParams`."""
    options = [
        click.option(
            "--steps", type=click.IntRange(1, 1000), default=_DEFAULTS.steps, show_default=True, help="Denoising steps."
        ),
        click.option(
            "--guidance-scale",
            type=click.FloatRange(0),
            default=_DEFAULTS.guidance_scale,
            show_default=True,
            help="How strongly to follow the instruction.",
        ),
        click.option(
            "--image-guidance-scale",
            type=click.FloatRange(0),
            default=_DEFAULTS.image_guidance_scale,
            show_default=True,
            help="How closely to stay with the input image.",
        ),
        click.option(
            "--seed",
            type=click.IntRange(0, 2**63 - 1),
            default=None,
            help="Seed for the initial noise; the same seed gives the same image. [default: random]",
        ),
        click.option(
            "--scheduler", type=click.Choice(list(SCHEDULERS)), default=None, help="Sampler. [default: the model's own]"
        ),
        click.option(
            "--max-side",
            type=click.IntRange(64, 4096),
            default=_DEFAULTS.max_side,
            show_default=True,
            help="Longest side the model works at; the output is resized back to the input's size.",
        ),
    ]

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        steps: int,
        guidance_scale: float,
        image_guidance_scale: float,
        seed: int | None,
        scheduler: str | None,
        max_side: int,
        **kwargs: Any,
    ) -> Any:
        try:
            params = EditParams(steps, guidance_scale, image_guidance_scale, seed, scheduler, max_side)
        except InvalidParameters as exc:
            raise click.BadParameter(str(exc)) from None
        return command(*args, params=params, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
