"""DPMSolverMultistepScheduler, algorithm "dpmsolver++": multistep data-prediction solver of order 1 to 3."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

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


class DPMSolverMultistepScheduler:
    """diffusers' DPMSolverMultistepScheduler for algorithm_type "dpmsolver++" (midpoint or heun, Karras sigmas)."""

    CLASS_NAME = "DPMSolverMultistepScheduler"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **BASE_DEFAULTS,
        "solver_order": 2,
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
    }
    FIXED = (
        "thresholding",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "lambda_min_clipped",
        "variance_type",
    )
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **BASE_CHOICES,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "solver_order": (1, 2, 3),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.cfg = resolve_config(config, self.CLASS_NAME, self.DEFAULTS, self.FIXED, self.CHOICES)
        self._train_sigmas = train_sigmas(self.cfg)
        self.timesteps = np.zeros(0, np.float32)
        self.sigmas = np.zeros(0, np.float32)  # one per step plus the final one, set by set_timesteps
        self._history: list[np.ndarray] = []  # the latest solver_order x0 estimates, oldest first

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg, train = self.cfg, self._train_sigmas
        if cfg["timestep_spacing"] == "trailing":
            timesteps = spaced_timesteps(cfg, num_inference_steps, round_linspace=True)
        else:  # spread one step too many, then drop the step at t=0
            timesteps = spaced_timesteps(cfg, num_inference_steps + 1, round_linspace=True)[:-1]
        timesteps = timesteps.astype(np.int64)
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(train[0]), float(train[-1]), num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        self.sigmas = np.append(sigmas, final_sigma(cfg, train)).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self._history = []

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def _alpha_sigma_lambda(self, index: int) -> tuple[np.float32, np.float32, np.float32]:
        """Signal scale alpha_t, noise scale sigma_t and log-SNR lambda = log(alpha_t / sigma_t) at sigmas[index]."""
        sigma = self.sigmas[index]
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        sigma_t = sigma * alpha_t
        with np.errstate(divide="ignore"):  # sigma 0 at the end: lambda is +inf and the step returns x0
            return alpha_t, sigma_t, np.log(alpha_t) - np.log(sigma_t)

    def _order(self, step_index: int) -> int:
        """The solver order for this step: limited by history, and lowered at the end of short schedules."""
        cfg, count = self.cfg, len(self.timesteps)
        short = cfg["lower_order_final"] and count < 15
        if step_index == count - 1 and (cfg["euler_at_final"] or short or cfg["final_sigmas_type"] == "zero"):
            return 1
        if step_index == count - 2 and short:
            return min(len(self._history), 2)
        return len(self._history)

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(step_index)
        if self.cfg["prediction_type"] == "epsilon":
            denoised = (sample - sigma_s0 * model_output) / alpha_s0
        elif self.cfg["prediction_type"] == "v_prediction":
            denoised = alpha_s0 * sample - sigma_s0 * model_output
        else:
            denoised = model_output
        self._history = [*self._history, denoised][-self.cfg["solver_order"] :]
        order = self._order(step_index)
        sample = sample.astype(np.float32, copy=False)

        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(step_index + 1)
        h = lambda_t - lambda_s0
        decay = alpha_t * (np.exp(-h) - 1.0)
        m0 = denoised
        prev_sample = (sigma_t / sigma_s0) * sample - decay * m0
        if order == 1:
            return prev_sample
        m1, lambda_s1 = self._history[-2], self._alpha_sigma_lambda(step_index - 1)[2]
        r0 = (lambda_s0 - lambda_s1) / h
        d1 = (1.0 / r0) * (m0 - m1)
        if order == 2 and self.cfg["solver_type"] == "midpoint":
            return prev_sample - 0.5 * decay * d1
        heun = alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)
        if order == 2:
            return prev_sample + heun * d1
        m2, lambda_s2 = self._history[-3], self._alpha_sigma_lambda(step_index - 2)[2]
        r1 = (lambda_s1 - lambda_s2) / h
        d1_1 = (1.0 / r1) * (m1 - m2)
        d2 = (1.0 / (r0 + r1)) * (d1 - d1_1)
        d1 = d1 + (r0 / (r0 + r1)) * (d1 - d1_1)
        return prev_sample + heun * d1 - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
