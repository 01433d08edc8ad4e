"""LCMScheduler: latent consistency sampling, a few steps over a subset of a distillation schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from core.errors import InvalidModel, InvalidParameters
from core.schedulers.common import BASE_CHOICES, BASE_DEFAULTS, alphas_cumprod, resolve_config

SIGMA_DATA = 0.5  # the data's standard deviation in the consistency boundary conditions, fixed in diffusers


class LCMScheduler:
    """diffusers' LCMScheduler: each step maps the sample to the model's clean estimate, then noises it afresh to
    the next timestep's level; the last step returns the estimate itself.

    Its timesteps are `num_inference_steps` of the `original_inference_steps` the model was distilled on, whatever
    the config's timestep_spacing and steps_offset, and no step reads past the first training timestep, so
    set_alpha_to_one has no effect either: diffusers takes the three keys and ignores them, and so does the port.
    """

    CLASS_NAME = "LCMScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BASE_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "timestep_scaling": 10.0,
    }
    FIXED = ("thresholding",)
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        "beta_schedule": BASE_CHOICES["beta_schedule"],
        "prediction_type": ("epsilon", "v_prediction", "sample"),
    }
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.cfg = resolve_config(config, self.CLASS_NAME, self.DEFAULTS, self.FIXED, self.CHOICES)
        if not 1 <= self.cfg["original_inference_steps"] <= self.cfg["num_train_timesteps"]:
            raise InvalidModel(
                f"{self.CLASS_NAME}: scheduler config original_inference_steps={self.cfg['original_inference_steps']}"
                f" must be 1..num_train_timesteps ({self.cfg['num_train_timesteps']})"
            )
        self._alphas_cumprod = alphas_cumprod(self.cfg)
        self._train_timesteps = np.zeros(0, np.int64)
        self.timesteps = np.zeros(0, np.float32)

    def set_timesteps(self, num_inference_steps: int) -> None:
        original = self.cfg["original_inference_steps"]
        if num_inference_steps > original:
            raise InvalidParameters(
                f"{self.CLASS_NAME} takes at most {original} steps (the model's original_inference_steps),"
                f" got {num_inference_steps}"
            )
        stride = self.cfg["num_train_timesteps"] // original
        distilled = (np.arange(original, 0, -1) * stride - 1).astype(np.int64)  # descending, ending at stride - 1
        picked = np.floor(np.linspace(0, original, num_inference_steps, endpoint=False)).astype(np.int64)
        self._train_timesteps = distilled[picked]
        self.timesteps = self._train_timesteps.astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def _boundary_scalings(self, step_index: int) -> tuple[np.float32, np.float32]:
        """The consistency model's c_skip and c_out at this step: how much of the sample and of the model's clean
        estimate make up the denoised sample (c_skip is near 0 except at the smallest timesteps)."""
        scaled = self.timesteps[step_index] * np.float32(self.cfg["timestep_scaling"])
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        sample = sample.astype(np.float32, copy=False)
        alpha_prod_t = self._alphas_cumprod[self._train_timesteps[step_index]]
        beta_prod_t = 1 - alpha_prod_t
        if self.cfg["prediction_type"] == "epsilon":
            predicted = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        elif self.cfg["prediction_type"] == "sample":
            predicted = model_output
        else:
            predicted = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
        if self.cfg["clip_sample"]:
            limit = self.cfg["clip_sample_range"]
            predicted = np.clip(predicted, -limit, limit)
        c_skip, c_out = self._boundary_scalings(step_index)
        denoised = c_out * predicted + c_skip * sample
        if step_index == len(self.timesteps) - 1:
            return denoised
        alpha_prod_next = self._alphas_cumprod[self._train_timesteps[step_index + 1]]
        noise = rng.standard_normal(model_output.shape, dtype=np.float32)
        return np.sqrt(alpha_prod_next) * denoised + np.sqrt(1 - alpha_prod_next) * noise
