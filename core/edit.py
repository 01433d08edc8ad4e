"""The edit flow both backends share, so ONNX and torch see the same pixels and the same noise.

A backend only turns model-input pixels into output pixels (`Backend.generate`). Everything around it
(the model's default settings, working size, seed choice, the initial noise, resizing back) happens
here, once.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from core.images import restore_size, to_model_input, working_size
from core.params import EditParams


class Backend(Protocol):
    edit_defaults: Mapping[str, float]  # the model's own steps / guidance scales (`core.params`), may be empty

    def generate(self, pixels: np.ndarray, instruction: str, params: EditParams, seed: int) -> np.ndarray:
        """float32 [1, 3, H, W] in [-1, 1] -> uint8 [H, W, 3] edited pixels at the same size; `params` are
        resolved (no unset steps or guidance)."""
        ...


@dataclass
class Edit:
    image: Image.Image
    seed: int
    working_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)


def initial_latents(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit Gaussian latents; both backends draw them here so a seed means the same start."""
    return rng.standard_normal(shape, dtype=np.float32)


def resolve_seed(params: EditParams) -> int:
    return params.seed if params.seed is not None else secrets.randbits(63)


def edit_image(backend: Backend, image: Image.Image, instruction: str, params: EditParams) -> Edit:
    """Edit one RGB image; the result has the input's size."""
    params = params.resolve(backend.edit_defaults)
    size = working_size(*image.size, params.max_side)
    seed = resolve_seed(params)
    pixels = backend.generate(to_model_input(image, size), instruction, params, seed)
    return Edit(restore_size(pixels, image.size), seed, size)
