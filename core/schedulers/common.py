"""Noise-schedule arithmetic the ported diffusers schedulers share: config merging, betas, timesteps, sigmas.

Dtypes follow diffusers so results match it within float32 rounding: betas and alphas_cumprod are float32 and equal
torch's bit for bit (torch's CPU linspace rounds a fused multiply-add; its cumprod accumulates in float64), timestep
spacing and sigma interpolation run in float64, and the sigma table each scheduler steps with is float32. Sigmas can
still differ from diffusers' in the last bit: numpy's sqrt is correctly rounded, torch's vectorised CPU sqrt not always.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from core.errors import InvalidModel

# The `__init__` defaults that every ported diffusers scheduler shares.
BASE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
BASE_CHOICES: dict[str, tuple[Any, ...]] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "linspace", "trailing"),
}


def resolve_config(
    config: Mapping[str, Any],
    class_name: str,
    defaults: Mapping[str, Any],
    fixed: tuple[str, ...],
    choices: Mapping[str, tuple[Any, ...]],
) -> dict[str, Any]:
    """Merge `config` into a class's defaults as diffusers' `from_config` does, refusing what the port lacks.

    Only keys the class takes are read; the rest belong to other classes and are ignored. A key in `fixed` must keep
    its default (the port does not implement the alternative) and a key in `choices` must hold one of its values.
    """
    cfg = {key: config.get(key, default) for key, default in defaults.items()}
    for key in fixed:
        if cfg[key] != defaults[key]:
            raise InvalidModel(f"{class_name}: scheduler config {key}={cfg[key]!r} is not supported by the numpy port")
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            options = ", ".join(map(repr, allowed))
            raise InvalidModel(f"{class_name}: scheduler config {key}={cfg[key]!r} is not supported; use {options}")
    return cfg


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The Glide cosine schedule ("squaredcos_cap_v2"), computed in Python floats as diffusers does."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _linspace32(start: float, end: float, count: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: a fused multiply-add from the nearer end of the range."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(count - 1, 1)))
    i = np.arange(count)
    return np.where(i < count // 2, start32 + step * i, end32 - step * (count - 1 - i)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last timestep is pure noise (Lin et al. 2023, algorithm 1), in float32 as diffusers computes them.

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first is unchanged.
    """
    root = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    cumprod = root**2
    return (1 - np.concatenate([cumprod[:1], cumprod[1:] / cumprod[:-1]])).astype(np.float32)


def alphas_cumprod(cfg: Mapping[str, Any], terminal: float = 0.0) -> np.ndarray:
    """The cumulative product of (1 - beta) over the training timesteps, float32.

    With `rescale_betas_zero_snr` the last value, 0 by construction, is set to `terminal`.
    """
    n, start, end = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = _linspace32(start, end, n)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = _linspace32(start**0.5, end**0.5, n) ** 2
    else:
        betas = _cosine_betas(n)
    zero_snr = cfg["rescale_betas_zero_snr"]
    cumprod = np.cumprod((1.0 - (_rescale_zero_terminal_snr(betas) if zero_snr else betas)).astype(np.float64))
    cumprod = cumprod.astype(np.float32)
    if zero_snr:
        cumprod[-1] = terminal
    return cumprod


def train_sigmas(cfg: Mapping[str, Any]) -> np.ndarray:
    """Noise-to-signal ratio sqrt((1 - a) / a) per training timestep, float32, ascending with t.

    Where zero terminal SNR leaves the last alphas_cumprod at 0, fp16's smallest subnormal stands in, as in
    diffusers' sigma-based schedulers, so the first sigma is large (4096), not infinite.
    """
    cumprod = alphas_cumprod(cfg, terminal=2.0**-24)
    return ((1 - cumprod) / cumprod) ** 0.5


def spaced_timesteps(cfg: Mapping[str, Any], count: int, *, round_linspace: bool) -> np.ndarray:
    """`count` descending training timesteps spread per `timestep_spacing`, float64 before each class's cast.

    "leading" adds `steps_offset`; "linspace" is rounded to integers only where the class rounds it.
    """
    n_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, n_train - 1, count)
        return (t.round() if round_linspace else t)[::-1].copy()
    if spacing == "leading":
        return (np.arange(count) * (n_train // count)).round()[::-1] + cfg["steps_offset"]
    return np.arange(n_train, 0, -n_train / count).round() - 1


def karras_sigmas(sigma_min: float, sigma_max: float, count: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels from sigma_max down to sigma_min, float64."""
    ramp = np.linspace(0, 1, count)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigmas are `sigmas`, interpolating linearly in log-sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train_sigmas.shape[0] - 2)
    low, high = log_train_sigmas[low_idx], log_train_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


def final_sigma(cfg: Mapping[str, Any], train: np.ndarray) -> float:
    """The sigma a schedule ends on: 0, or the smallest training sigma where final_sigmas_type is "sigma_min".

    Classes without the key (EulerAncestralDiscreteScheduler) always end on 0.
    """
    return float(train[0]) if cfg.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
