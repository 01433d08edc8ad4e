"""The edit loop both backends share, tiled, so ONNX and torch see the same pixels, tiles and noise.

A backend supplies only the model calls (`Backend`: text encoder, VAE encoder, UNet, VAE decoder) and the
model's facts. Everything else happens here, once: the model's default settings, the working size (the
input's own, unless `max_side` shrinks it), padding to the latent grid, the seed and the initial noise,
and InstructPix2Pix's sampling loop, step for step diffusers' `StableDiffusionInstructPix2PixPipeline`:
image latents from the VAE encoder's mode, 3-way classifier-free guidance with the batch ordered
`[text+image, image only, neither]` and image latents `[img, img, 0]`, then the VAE decoder. Two levers
cut the UNet's work without changing that result: a copy whose weight in the guidance is zero (image
guidance 1, or equal scales) is not computed, and `guidance_until` < 1 ends guidance early, as diffusers'
CFG cutoff callback does: the steps after it run the text+image copy alone.

The unit of compute is the tile (`core.tiles`): the VAE encodes and decodes overlapping tiles of the
model's native size, and at every step the UNet runs on batches of latent tiles (CFG copies included),
their guided predictions are blended with weights that sum to one, and one scheduler step runs on the
whole latent, so the seed and the noise are those of the whole image. An image of several tiles is also
edited whole, shrunk to one tile, and that global view sets the coarse scale of the result where the tiles
disagree with it (`core.overview`): a tile never decides alone what the instruction means. An image that
fits in one tile makes one call of each model, exactly as an untiled pipeline does.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from core.errors import InvalidOutput
from core.images import pad_to_multiple, restore_size, to_model_input, to_uint8, working_size
from core.overview import global_view, merge
from core.params import LATENT_MULTIPLE, EditParams
from core.schedulers import Scheduler, make_scheduler
from core.tiles import Canvas, Layout, Tile

Progress = Callable[[int, int], None]  # (units done, units in all) after each model call on tiles
# The copies of a guided UNet batch, in diffusers' order: the image latents are [img, img, 0], the text
# [instruction, "", ""]. A step runs only the copies whose weight in the guidance is not zero (`guidance_copies`).
TEXT_IMAGE, IMAGE_ONLY, NEITHER = range(3)


@dataclass(frozen=True)
class ModelFacts:
    """What the loop needs to know about a model, from its manifest (ONNX) or its configs (torch)."""

    latent_channels: int
    vae_scale_factor: int  # pixels per latent
    latent_scaling_factor: float  # the VAE's scaling_factor: the decoder takes latents divided by it
    tile_size: int  # native side in px: the UNet's sample size times the VAE's scale factor
    scheduler_config: Mapping[str, Any]


class Backend(Protocol):
    edit_defaults: Mapping[str, Any]  # the model's own settings (`core.params`), may be empty
    facts: ModelFacts
    label: str  # what runs it, for results and reports: "onnxruntime CPUExecutionProvider", "openvino bf16"

    def encode_text(self, text: str) -> np.ndarray:
        """Token states float32 [1, sequence, hidden]."""
        ...

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [1, 3, h, w] in [-1, 1] -> the latent distribution's mode, float32 [1, C, h/s, w/s]."""
        ...

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        """UNet: sample float32 [B, 8, h, w], timestep float32 [B], text [B, sequence, hidden] -> [B, C, h, w]."""
        ...

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float32 [1, C, h, w], already divided by the scaling factor -> float32 [1, 3, h*s, w*s]."""
        ...


@dataclass(frozen=True)
class Tiling:
    """How the loop cuts an image. Neither size nor batch changes which image a seed gives, beyond rounding."""

    size: int | None = None  # tile side in px; None: the model's native size (`ModelFacts.tile_size`)
    batch: int = 1  # tiles per UNet call, each with its CFG copies (so the UNet batch is batch x 3 when guided)
    overview: bool = True  # False: each tile decides alone, no global view (what benchmarks compare against)

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"tile batch must be >= 1, got {self.batch}")


@dataclass
class Edit:
    image: Image.Image
    seed: int
    working_size: tuple[int, int]  # (width, height) the model worked at, before padding to the latent grid
    tiles: int  # UNet tiles per step


def initial_latents(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit Gaussian latents; both backends draw them here so a seed means the same start."""
    return rng.standard_normal(shape, dtype=np.float32)


def resolve_seed(params: EditParams) -> int:
    return params.seed if params.seed is not None else secrets.randbits(63)


def edit_image(
    backend: Backend,
    image: Image.Image,
    instruction: str,
    params: EditParams,
    tiling: Tiling = Tiling(),
    progress: Progress | None = None,
) -> Edit:
    """Edit one RGB image; the result has the input's size."""
    params = params.resolve(backend.edit_defaults)
    size = working_size(*image.size, params.max_side)
    seed = resolve_seed(params)
    pixels = to_model_input(pad_to_multiple(image, size, LATENT_MULTIPLE))
    layout = plan(backend.facts, pixels.shape[2], pixels.shape[3], tiling)
    edited = generate(backend, pixels, instruction, params, seed, layout, tiling.batch, progress, tiling.overview)
    return Edit(restore_size(edited[: size[1], : size[0]], image.size), seed, size, len(layout))


def plan(facts: ModelFacts, height: int, width: int, tiling: Tiling = Tiling()) -> Layout:
    """The latent tiles for a padded image of height x width px."""
    scale = facts.vae_scale_factor
    return Layout.plan(height // scale, width // scale, (tiling.size or facts.tile_size) // scale)


def generate(
    backend: Backend,
    pixels: np.ndarray,
    instruction: str,
    params: EditParams,
    seed: int,
    layout: Layout,
    tile_batch: int = 1,
    progress: Progress | None = None,
    overview: bool = True,
) -> np.ndarray:
    """float32 [1, 3, H, W] in [-1, 1] (sides multiples of the latent grid) -> uint8 [H, W, 3] edited pixels;
    `params` resolved, `layout` from `plan`. An image of several tiles is edited twice: whole, shrunk to one
    tile (the global view, which decides), and in `layout`'s tiles (the detail), merged (`core.overview`)."""
    facts = backend.facts
    side = layout.tile * facts.vae_scale_factor
    passes = [(pixels, layout, tile_batch)]
    if overview and len(layout) > 1:
        view = global_view(pixels, side)
        passes.append((view, plan(facts, view.shape[2], view.shape[3], Tiling(size=side)), 1))
    steps = len(_scheduler(facts, params).timesteps)
    count = CallCounter(progress, sum(2 * len(grid) + steps * -(-len(grid) // batch) for _, grid, batch in passes))
    edited, *whole = [sample(backend, *grid, instruction, params, seed, count) for grid in passes]
    if whole:
        edited = merge(edited, whole[0], side, params.detail)
    return to_uint8(edited)


def sample(
    backend: Backend,
    pixels: np.ndarray,
    layout: Layout,
    tile_batch: int,
    instruction: str,
    params: EditParams,
    seed: int,
    count: CallCounter | None = None,
) -> np.ndarray:
    """One pass of InstructPix2Pix over `layout`'s tiles, each deciding for itself: float32 [3, H, W] decoded
    pixels in about [-1, 1]. `generate` runs it for the tiles and for the global view, and merges them."""
    count = count or CallCounter(None, 0)
    facts = backend.facts
    scheduler = _scheduler(facts, params)

    pixel_layout = layout.scaled(facts.vae_scale_factor)
    image_latents = Canvas(layout, facts.latent_channels)
    for tile, pixel_tile in zip(layout.tiles, pixel_layout.tiles, strict=True):
        image_latents.add(tile, backend.encode_image(np.ascontiguousarray(pixel_tile.window(pixels)))[0])
        count.step()
    prompts = {TEXT_IMAGE: backend.encode_text(instruction)}
    if params.guided:
        prompts[IMAGE_ONLY] = prompts[NEITHER] = backend.encode_text("")
    guided, unguided = guidance_copies(params), (TEXT_IMAGE,)
    texts = {
        copies: np.concatenate([prompts[c] for c in copies] * min(tile_batch, len(layout)))
        for copies in {guided, unguided}
    }

    rng = np.random.default_rng(seed)
    latents = initial_latents(rng, image_latents.array.shape) * np.float32(scheduler.init_noise_sigma)
    for index, t in enumerate(scheduler.timesteps):
        copies = guided if index < params.guided_steps else unguided
        model_input = scheduler.scale_model_input(latents, index)
        noise = Canvas(layout, facts.latent_channels)
        for group, padded in _groups(layout, tile_batch):
            samples = []
            for tile in padded:
                tile_latents = tile.window(image_latents.array)
                conditioning = (tile_latents, tile_latents, np.zeros_like(tile_latents))  # by copy
                samples += [np.concatenate([tile.window(model_input), conditioning[c]], axis=1) for c in copies]
            predicted = backend.predict_noise(
                np.concatenate(samples), np.full(len(samples), t, np.float32), texts[copies]
            )
            for tile, output in zip(group, np.split(predicted, len(padded)), strict=False):  # padding dropped
                noise.add(tile, _guide(dict(zip(copies, output, strict=True)), params))
            count.step()
        latents = scheduler.step(noise.array, index, latents, rng)

    decoded = Canvas(pixel_layout, 3)
    latents /= facts.latent_scaling_factor
    for tile, pixel_tile in zip(layout.tiles, pixel_layout.tiles, strict=True):
        decoded.add(pixel_tile, backend.decode(np.ascontiguousarray(tile.window(latents)))[0])
        count.step()
    if not np.isfinite(decoded.array).all():  # NaN would be written as black and reported done
        raise InvalidOutput("the model's output has NaN or infinite values (broken weights or an overflowing graph)")
    return decoded.array[0]


def _scheduler(facts: ModelFacts, params: EditParams) -> Scheduler:
    scheduler = make_scheduler(facts.scheduler_config, params.scheduler)
    scheduler.set_timesteps(params.steps)
    return scheduler


def guidance_copies(params: EditParams) -> tuple[int, ...]:
    """The copies a guided step's UNet batch holds: those whose weight in InstructPix2Pix's 3-way guidance,
    `neither + gs (text_image - image_only) + igs (image_only - neither)`
    `= gs text_image + (igs - gs) image_only + (1 - igs) neither`, is not zero. Image guidance 1 needs no
    `neither` copy, equal scales no `image_only` copy; the text+image copy's weight, gs, is over 1 when guided."""
    if not params.guided:
        return (TEXT_IMAGE,)
    weights = {
        IMAGE_ONLY: params.image_guidance_scale - params.guidance_scale,
        NEITHER: 1.0 - params.image_guidance_scale,
    }
    return (TEXT_IMAGE, *(copy for copy, weight in weights.items() if weight != 0.0))


def _guide(predicted: dict[int, np.ndarray], params: EditParams) -> np.ndarray:
    """One tile's guided noise from its copies' predictions (`guidance_copies`); a lone copy is the noise. The
    sum runs in float64, so a copy of weight zero left out changes nothing beyond float32's last bit."""
    text_image = predicted[TEXT_IMAGE]
    if len(predicted) == 1:
        return text_image
    text_image, gs, igs = text_image.astype(np.float64), params.guidance_scale, params.image_guidance_scale
    if len(predicted) == 2:  # the 3-way formula with the copy of weight 0 gone: base + gs (text_image - base)
        base = predicted.get(IMAGE_ONLY, predicted.get(NEITHER)).astype(np.float64)
        return (base + gs * (text_image - base)).astype(np.float32)
    image_only, neither = predicted[IMAGE_ONLY].astype(np.float64), predicted[NEITHER].astype(np.float64)
    return (neither + gs * (text_image - image_only) + igs * (image_only - neither)).astype(np.float32)


def _groups(layout: Layout, size: int) -> Iterator[tuple[list[Tile], list[Tile]]]:
    """The tiles in UNet batches of `size`, each as (its tiles, its tiles padded to `size`): a short last batch
    repeats its last tile, whose extra outputs are dropped, so every call has one shape. An image of fewer
    tiles runs them all at once."""
    tiles = layout.tiles
    size = min(size, len(tiles))
    for start in range(0, len(tiles), size):
        group = tiles[start : start + size]
        yield group, group + [group[-1]] * (size - len(group))


class CallCounter:
    """Reports (model calls done, model calls in all) to a `Progress` after each call."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
