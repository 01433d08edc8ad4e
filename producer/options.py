"""The options `edit`, `submit`, `run`, `worker` and `evaluate` share, each defined once as a click decorator.

They live with the root group (producer.cli), which every install has; `core` stays free of click."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import click

from core.errors import InvalidParameters
from core.params import LIMITS, PROJECT_DEFAULTS, SCHEDULERS, EditParams
from core.settings import PRECISIONS, RUNTIMES


def _model_default(name: str) -> str:
    return f"[default: the model's (edit_defaults.json), else {PROJECT_DEFAULTS[name]}]"


def _ranged(name: str) -> click.ParamType:
    """The option type of an edit parameter, from its one declaration (core.params.LIMITS)."""
    limit = LIMITS[name]
    return (click.IntRange if limit.whole else click.FloatRange)(limit.low, limit.high)


def edit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --steps ... --strip-metadata to a command; it receives them as one `params: EditParams`."""
    options = [
        click.option(
            "--steps",
            type=_ranged("steps"),
            default=None,
            help=f"Denoising steps. {_model_default('steps')}",
        ),
        click.option(
            "--guidance-scale",
            type=_ranged("guidance_scale"),
            default=None,
            help=f"How strongly to follow the instruction. {_model_default('guidance_scale')}",
        ),
        click.option(
            "--image-guidance-scale",
            type=_ranged("image_guidance_scale"),
            default=None,
            help=f"How closely to stay with the input image. {_model_default('image_guidance_scale')}",
        ),
        click.option(
            "--seed",
            type=_ranged("seed"),
            default=None,
            help="Seed for the initial noise; the same seed gives the same image. [default: random]",
        ),
        click.option(
            "--scheduler", type=click.Choice(list(SCHEDULERS)), default=None, help="Sampler. [default: the model's own]"
        ),
        click.option(
            "--max-side",
            type=_ranged("max_side"),
            default=None,
            help="Shrink first so the longest side is at most this (faster, coarser); the output is resized back "
            "to the input's size. [default: the model's (edit_defaults.json), else the input's own size, in tiles]",
        ),
        click.option(
            "--detail",
            type=_ranged("detail"),
            default=None,
            help="An image of several tiles is edited whole at one tile (which decides tone, colour and whether to "
            "change) and in tiles at its own size: how much of the tiles' finer detail to add (0: the whole view "
            f"enlarged). {_model_default('detail')}",
        ),
        click.option(
            "--guidance-until",
            type=_ranged("guidance_until"),
            default=None,
            help="The fraction of the steps, from the first, that run classifier-free guidance; the rest run one "
            "UNet copy instead of three (0.4 of 20 steps: 36 UNet evaluations instead of 60). "
            f"{_model_default('guidance_until')}",
        ),
        click.option(
            "--strip-gps",
            is_flag=True,
            help="Leave the location out of the outputs (EXIF's GPS, XMP's GPS); the rest of the photo's metadata "
            "stays. [default: outputs keep the photo's EXIF, XMP and IPTC]",
        ),
        click.option(
            "--strip-metadata",
            is_flag=True,
            help="Leave all of the photo's EXIF, XMP and IPTC out of the outputs (the colour profile stays).",
        ),
    ]

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        steps: int | None,
        guidance_scale: float | None,
        image_guidance_scale: float | None,
        seed: int | None,
        scheduler: str | None,
        max_side: int | None,
        detail: float | None,
        guidance_until: float | None,
        strip_gps: bool,
        strip_metadata: bool,
        **kwargs: Any,
    ) -> Any:
        metadata = "none" if strip_metadata else "no-gps" if strip_gps else "all"
        try:
            params = EditParams(
                steps, guidance_scale, image_guidance_scale, seed, scheduler, max_side, detail, guidance_until, metadata
            )
        except InvalidParameters as exc:
            raise click.BadParameter(str(exc)) from None
        return command(*args, params=params, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


tile_batch_option = click.option(
    "--tile-batch",
    type=click.IntRange(1, 64),
    envvar="ITSD_TILE_BATCH",
    default=1,
    show_default=True,
    help="Tiles per UNet call, each with its guidance copies: more feeds a GPU better. [env: ITSD_TILE_BATCH]",
)


def _env_choice(name: str, choices: tuple[str, ...], help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    env = f"ITSD_{name.upper()}"
    kind, text = click.Choice(choices), f"{help} [env: {env}]"
    return click.option(f"--{name}", type=kind, envvar=env, default="auto", show_default=True, help=text)


def runtime_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--runtime and --precision: what runs an artifact folder's graphs (worker.runtimes decides `auto`)."""
    runtime = _env_choice(
        "runtime",
        RUNTIMES,
        "onnxruntime (TensorRT, CUDA, CPU) or openvino (CPUs); auto: openvino on an x86 CPU that has it installed "
        "and no GPU, else onnxruntime.",
    )
    precision = _env_choice(
        "precision",
        PRECISIONS,
        "bf16 or int8 (openvino only), or fp32; each only once a probe edit shows it within ITSD_BF16_MIN_PSNR or "
        "ITSD_INT8_MIN_PSNR dB of fp32. auto: bf16 where the CPU has it natively, else int8, if measured 1.1x "
        "faster than fp32; else fp32.",
    )
    return runtime(precision(command))


def broker_url_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--broker (or ITSD_BROKER_URL): the Redis to use, a password only through the environment."""
    return click.option(
        "--broker",
        envvar="ITSD_BROKER_URL",
        metavar="URL",
        callback=no_password_on_argv,
        help="redis:// or rediss:// URL; a password only through the env. [env: ITSD_BROKER_URL]",
    )(command)


def no_password_on_argv(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A --broker callback: a URL with a password typed on the command line is refused (every user on the host
    can read a process's argv with `ps`); the same URL from ITSD_BROKER_URL is fine."""
    typed = ctx.get_parameter_source(param.name or "") == click.core.ParameterSource.COMMANDLINE
    if value and typed and urlsplit(value).password:
        raise click.BadParameter(
            "a password on the command line is visible to every user of this host (ps); "
            f"put the URL in {param.envvar or 'ITSD_BROKER_URL'} instead",
            ctx,
            param,
        )
    return value
