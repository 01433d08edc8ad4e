"""DDIMScheduler with eta 0: the deterministic DDIM update over alphas_cumprod."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from core.schedulers.common import (
    BASE_CHOICES,
    BASE_DEFAULTS,
    alphas_cumprod,
    resolve_config,
    spaced_timesteps,
)


class DDIMScheduler:
    """diffusers' DDIMScheduler stepped with eta=0 (no noise), clip_sample and set_alpha_to_one included."""

    CLASS_NAME = "DDIMScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BASE_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "thresholding": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
    }
    FIXED = ("thresholding",)
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **BASE_CHOICES,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
    }
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.cfg = resolve_config(config, self.CLASS_NAME, self.DEFAULTS, self.FIXED, self.CHOICES)
        self._alphas_cumprod = alphas_cumprod(self.cfg)
        # The alpha product after the last step, where there is no earlier training timestep to read it from.
        self._final_alpha_cumprod = np.float32(1.0) if self.cfg["set_alpha_to_one"] else self._alphas_cumprod[0]
        self._train_timesteps = np.zeros(0, np.int64)
        self._stride = 0
        self.timesteps = np.zeros(0, np.float32)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._stride = self.cfg["num_train_timesteps"] // num_inference_steps
        self._train_timesteps = spaced_timesteps(self.cfg, num_inference_steps, round_linspace=True).astype(np.int64)
        self.timesteps = self._train_timesteps.astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        t = self._train_timesteps[step_index]
        prev_t = t - self._stride  # diffusers steps back by the "leading" stride whatever the spacing
        alpha_prod_t = self._alphas_cumprod[t]
        alpha_prod_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        if self.cfg["prediction_type"] == "epsilon":
            denoised = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            eps = model_output
        elif self.cfg["prediction_type"] == "sample":
            denoised = model_output
            eps = (sample - alpha_prod_t**0.5 * denoised) / beta_prod_t**0.5
        else:
            denoised = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            eps = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        if self.cfg["clip_sample"]:
            limit = self.cfg["clip_sample_range"]
            denoised = np.clip(denoised, -limit, limit)
        return alpha_prod_prev**0.5 * denoised + (1 - alpha_prod_prev) ** 0.5 * eps
