"""A stand-in model with no weights: the fleet benchmark and the tests run the whole system on it.

It implements `core.edit.Backend` as a model whose latents are the pixels (scale 1, 3 channels) and whose
UNet predicts the clean sample, which it sets to `transform` of the input image. With a sample-predicting
Euler schedule the loop lands on that prediction, so an unguided edit (its defaults) returns
`transform(image)` to within rounding, through the real tiled loop, padding, cropping and resizing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from core.edit import ModelFacts

STANDIN_FACTS = ModelFacts(
    latent_channels=3,
    vae_scale_factor=1,
    latent_scaling_factor=1.0,
    tile_size=64,
    scheduler_config={"_class_name": "EulerDiscreteScheduler", "prediction_type": "sample"},
)


class StandInModel:
    """Edits by `transform` (on pixels in [-1, 1]); `on_image` runs once per VAE-encoded tile (a hook for delays
    and injected faults)."""

    edit_defaults: dict[str, float] = {"guidance_scale": 1.0, "image_guidance_scale": 1.0}  # noqa: RUF012 (read only)
    facts = STANDIN_FACTS

    def __init__(
        self, transform: Callable[[np.ndarray], np.ndarray] = lambda x: x, on_image: Callable[[], None] = lambda: None
    ) -> None:
        self.transform, self.on_image = transform, on_image

    def encode_text(self, text: str) -> np.ndarray:
        return np.zeros((1, 1, 1), dtype=np.float32)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        self.on_image()
        return pixels

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        return self.transform(sample[:, 3:])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return latents
