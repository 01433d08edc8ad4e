"""Euler samplers over a sigma (noise-to-signal) schedule: EulerDiscreteScheduler and its ancestral variant."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from core.errors import InvalidModel
from core.schedulers.common import (
    BASE_CHOICES,
    BASE_DEFAULTS,
    final_sigma,
    karras_sigmas,
    resolve_config,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)


class _SigmaScheduler:
    """What both Euler samplers share: the sigma table, input scaling and the Euler move toward a lower sigma."""

    CLASS_NAME: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]]
    FIXED: ClassVar[tuple[str, ...]]
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]]

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.cfg = resolve_config(config, self.CLASS_NAME, self.DEFAULTS, self.FIXED, self.CHOICES)
        self._train_sigmas = train_sigmas(self.cfg)
        self.timesteps = np.zeros(0, np.float32)
        self.sigmas = np.zeros(0, np.float32)  # one per step plus the final one, set by set_timesteps

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting noise for the current schedule (call set_timesteps first)."""
        top = self.sigmas.max()
        return float(top if self.cfg["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5)

    def set_timesteps(self, num_inference_steps: int) -> None:
        train = self._train_sigmas
        timesteps = spaced_timesteps(self.cfg, num_inference_steps, round_linspace=False).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        if self.cfg.get("use_karras_sigmas"):
            low, high = self.cfg["sigma_min"], self.cfg["sigma_max"]
            low, high = sigmas[-1] if low is None else low, sigmas[0] if high is None else high
            sigmas = karras_sigmas(low, high, num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train))
        self.sigmas = np.append(sigmas, final_sigma(self.cfg, train)).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample / ((self.sigmas[step_index] ** 2 + 1) ** 0.5)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, step_index: int) -> np.ndarray:
        """The model's estimate of the clean sample x0."""
        sigma = self.sigmas[step_index]
        if self.cfg["prediction_type"] == "epsilon":
            return sample - sigma * model_output
        if self.cfg["prediction_type"] == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        return model_output

    def _move(self, sample: np.ndarray, denoised: np.ndarray, step_index: int, sigma_next: np.float32) -> np.ndarray:
        """One Euler step of the probability-flow ODE from this step's sigma to `sigma_next`."""
        sigma = self.sigmas[step_index]
        derivative = (sample - denoised) / sigma
        return sample + derivative * (sigma_next - sigma)


class EulerDiscreteScheduler(_SigmaScheduler):
    """diffusers' EulerDiscreteScheduler (s_churn 0), with Karras sigmas and final_sigmas_type "zero"/"sigma_min"."""

    CLASS_NAME = "EulerDiscreteScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BASE_DEFAULTS,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }
    FIXED = ("interpolation_type", "use_exponential_sigmas", "use_beta_sigmas")
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **BASE_CHOICES,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        if self.cfg["timestep_type"] == "continuous" and self.cfg["prediction_type"] == "v_prediction":
            raise InvalidModel(f"{self.CLASS_NAME}: scheduler config timestep_type='continuous' is not supported")

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        sample = sample.astype(np.float32, copy=False)
        denoised = self._denoised(model_output, sample, step_index)
        return self._move(sample, denoised, step_index, self.sigmas[step_index + 1])


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """diffusers' EulerAncestralDiscreteScheduler: an Euler step to a lower sigma, then fresh noise back up."""

    CLASS_NAME = "EulerAncestralDiscreteScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {**BASE_DEFAULTS, "timestep_spacing": "linspace"}
    FIXED = ()
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {**BASE_CHOICES, "prediction_type": ("epsilon", "v_prediction")}

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        sample = sample.astype(np.float32, copy=False)
        sigma_from, sigma_to = self.sigmas[step_index], self.sigmas[step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev_sample = self._move(sample, self._denoised(model_output, sample, step_index), step_index, sigma_down)
        return prev_sample + rng.standard_normal(model_output.shape, dtype=np.float32) * sigma_up
